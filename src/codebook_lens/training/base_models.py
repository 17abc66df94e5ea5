"""Base models: a small causal LM from scratch (``ModelConfig``, ``build_model``) or a saved one.

``build_model(ModelConfig(arch="llama", num_layers=4), tokenizer)`` is a randomly initialised
Hugging Face causal LM sized for the tokenizer; ``load_base_model(name)`` loads a folder written
by ``save_pretrained`` (a plain or a codebook model, or a run folder's ``model/``) or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from codebook_lens.config import check_choice, check_int, check_range
from codebook_lens.model.codebook_model import CONFIG_NAME, CodebookModel
from codebook_lens.model.tokenizer import separator_id

ModelArch = Literal["gpt_neox", "llama", "gpt2"]
MODEL_DIR = "model"
"""The final model's folder inside a run folder (``OUT/model``)."""


@dataclass
class ModelConfig:
    """A small causal LM trained from scratch by ``codebook-lens pretrain``."""

    arch: ModelArch = "gpt_neox"
    """Architecture: 'gpt_neox', 'llama' or 'gpt2' (random init from a transformers config)."""

    num_layers: int = 2
    """Transformer blocks."""

    width: int = 128
    """Hidden size (d_model)."""

    heads: int = 4
    """Attention heads (width must divide by it)."""

    mlp_ratio: int = 4
    """MLP hidden size = width * mlp_ratio."""

    context: int = 512
    """Maximum sequence length (position embeddings)."""

    dropout: float = 0.0
    """Dropout probability in attention and MLP (where the architecture has it)."""

    tokenizer: str = "bpe:2048"
    """'bpe:N' (byte-level BPE trained on the training split), 'gpt2', or a folder / hub id."""

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ("gpt_neox", "llama", "gpt2"))
        for name in ("num_layers", "width", "heads", "mlp_ratio", "context"):
            check_int(name, getattr(self, name), 1)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is invalid for heads={self.heads}: it must divide evenly"
            )


def build_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised causal LM of ``cfg`` sized for ``tokenizer``'s vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    vocab = len(tokenizer)
    eos = separator_id(tokenizer)
    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}
    hf_cfg: Any
    if cfg.arch == "gpt2":
        hf_cfg = GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.width,
            n_head=cfg.heads,
            n_inner=cfg.width * cfg.mlp_ratio,
            n_positions=cfg.context,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    elif cfg.arch == "gpt_neox":
        hf_cfg = GPTNeoXConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.width,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.width * cfg.mlp_ratio,
            max_position_embeddings=cfg.context,
            attention_dropout=cfg.dropout,
            hidden_dropout=cfg.dropout,
            tie_word_embeddings=True,
            **common,
        )
    else:
        hf_cfg = LlamaConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.width,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.width * cfg.mlp_ratio,
            max_position_embeddings=cfg.context,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=True,
            **common,
        )
    return AutoModelForCausalLM.from_config(hf_cfg)


def resolve_model_path(path: str) -> str:
    """A run folder (with ``model/``) -> its model folder; other paths and hub ids unchanged."""
    p = Path(path)
    if (
        p.is_dir()
        and not (p / "config.json").is_file()
        and (p / MODEL_DIR / "config.json").is_file()
    ):
        return str(p / MODEL_DIR)
    return path


def load_base_model(name: str) -> tuple[nn.Module, str]:
    """A causal LM (plain, or a saved codebook model) from a folder or hub id; clear errors."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return CodebookModel.from_pretrained(path), path
    looks_local = p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not p.is_dir():
        raise FileNotFoundError(f"--base {name}: no such model folder")
    try:
        return AutoModelForCausalLM.from_pretrained(path), path
    except Exception as e:  # offline hub, unknown name, missing files: one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"--base {name}: cannot load a causal LM ({msg}). Pass a folder saved by "
            "`codebook-lens pretrain` / save_pretrained, or a hub id when online"
        ) from None
