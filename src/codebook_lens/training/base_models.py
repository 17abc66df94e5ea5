"""Base models: a small causal LM from scratch (``ModelConfig``, ``build_model``) or a saved one.

``build_model(ModelConfig(arch="llama", num_layers=4), tokenizer)`` is a randomly initialised
Hugging Face causal LM sized for the tokenizer; ``load_base_model(name)`` loads a folder written
by ``save_pretrained`` (a plain or a codebook model, or a run folder's ``model/``) or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

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

    mlp_width: int | None = None
    """MLP hidden size; None: width * mlp_ratio."""

    rotary_fraction: float | None = None
    """gpt_neox: fraction of each head's dimensions with rotary positions (None: HF's 0.25)."""

    rotary_scale: float = 1.0
    """gpt_neox and llama: every rotary frequency times this (HF's linear RoPE scaling with
    factor 1/scale)."""

    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ("gpt_neox", "llama", "gpt2"))
        for name in ("num_layers", "width", "heads", "mlp_ratio", "context"):
            check_int(name, getattr(self, name), 1)
        if self.mlp_width is not None:
            check_int("mlp_width", self.mlp_width, 1)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if self.rotary_fraction is not None and not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if not 0 < self.rotary_scale <= 4:
            raise ValueError(f"rotary_scale={self.rotary_scale} must be in (0, 4]")
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is invalid for heads={self.heads}: it must divide evenly"
            )


class Vocab(NamedTuple):
    """What a model needs to know of its tokenizer."""

    size: int
    """Tokens in the vocabulary."""
    bos_id: int
    """Beginning-of-sequence token."""
    eos_id: int
    """End-of-sequence token."""


def build_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised causal LM of ``cfg`` (global torch RNG) sized for ``tokenizer``'s
    vocabulary, or for a ``Vocab``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    if isinstance(tokenizer, Vocab):
        vocab = tokenizer
    else:
        eos = separator_id(tokenizer)
        vocab = Vocab(len(tokenizer), eos, eos)
    mlp = cfg.mlp_width if cfg.mlp_width is not None else cfg.width * cfg.mlp_ratio
    common: dict[str, Any] = {
        "vocab_size": vocab.size,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch == "gpt2":
        hf_cfg: Any = GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.width,
            n_head=cfg.heads,
            n_inner=mlp,
            n_positions=cfg.context,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
        return AutoModelForCausalLM.from_config(hf_cfg)
    shared = {
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.width,
        "num_attention_heads": cfg.heads,
        "intermediate_size": mlp,
        "max_position_embeddings": cfg.context,
        "attention_dropout": cfg.dropout,
        **common,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if cfg.rotary_scale != 1.0:
        rope = {**rope, "rope_type": "linear", "factor": 1.0 / cfg.rotary_scale}
    if cfg.arch == "gpt_neox":
        if cfg.rotary_fraction is not None or cfg.rotary_scale != 1.0:
            fraction = 0.25 if cfg.rotary_fraction is None else cfg.rotary_fraction
            shared["rope_parameters"] = {**rope, "partial_rotary_factor": fraction}
        hf_cfg = GPTNeoXConfig(hidden_dropout=cfg.dropout, **shared)
    else:
        if cfg.rotary_scale != 1.0:
            shared["rope_parameters"] = rope
        hf_cfg = LlamaConfig(**shared)
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
