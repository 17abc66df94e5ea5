"""Which causal-LM architectures of the installed transformers take codebooks, checked.

For every ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (minus
``SKIPPED``, each with its reason) a tiny random model is built on CPU from
``AutoConfig.for_model(model_type, **tiny sizes)`` and each placement is checked: codebooks
attach, codes have the documented shapes, codes change the logits, codebooks off gives logits
bit-identical to the base model; then, with every available placement at once, a save / load
round trip gives the same logits and one training step changes every codebook.

``check_architectures()`` returns the measured facts; ``architectures_markdown()`` renders
them as ``docs/architectures.md`` (``codebook-lens architectures --write ...``);
``tests/test_architectures.py`` asserts on the same results.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from codebook_lens.config import write_bytes_atomic
from codebook_lens.model.codebook_model import CodebookModel, attach_codebooks
from codebook_lens.model.config import PLACEMENTS, CodebookConfig
from codebook_lens.model.sites import find_blocks, text_config

TINY_SIZES: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention wherever the config has it
    "head_dim": 16,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "d_ff": 128,
    "dff": 128,
    "ffn_hidden_size": 128,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "rotary_dim": 8,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "shared_expert_intermediate_size": 32,
    "n_group": 1,
    "topk_group": 1,
    # state-space blocks (Mamba 1/2 and the hybrids): 8 heads of 16, small state and chunks
    # (the torch fallback pads every sequence to a whole chunk)
    "state_size": 16,
    "ssm_state_size": 16,
    "mamba_d_state": 16,
    "mamba_d_ssm": 128,
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "n_mamba_heads": 8,
    "n_groups": 1,
    "mamba_n_groups": 1,
    "mamba_ngroups": 1,
    "mamba_chunk_size": 8,
    "chunk_size": 8,
    # sparse-attention indexers (DeepSeek V3.2 style)
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 4,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}
"""Sizes given to every config that has the field: 2 blocks, width 64, 4 query heads of 16."""

# Inkling's sliding-window attention sizes, shared by its three text models.
_INKLING_SWA: dict[str, Any] = {
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "d_rel": 4,
    "rel_extent": 16,
    "sliding_window_size": 8,
}

OVERRIDES: dict[str, dict[str, Any]] = {
    # 2 blocks need a 2-entry attention pattern (the default has 24).
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    # Hybrids: one state-space / linear-attention block, one attention block (the default
    # patterns put the first attention block past block 2).
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zamba": {"layers_block_type": ["hybrid", "hybrid"], "use_mamba_kernels": False},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "nemotron_h": {
        "num_hidden_layers": 4,
        "layers_block_type": ["mamba", "attention", "mlp", "moe"],
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # Each decoder layer holds two attention + MLP sub-layers: 4 sub-layers = 2 blocks.
    "longcat_flash": {"num_hidden_layers": 4},
    # A looped model: its middle blocks run n_recurrent_loops times per forward pass; here no
    # block is looped (see NOTES).
    "dory": {"n_recurrent_loops": 1, "n_input_layers": 1, "n_output_layers": 1},
    "mamba2": {"num_heads": 8},  # num_heads * head_dim must equal 2 * hidden_size
    "xlstm": {"qk_dim_factor": 1.0},  # its native kernel fails for query/key heads of 8
    "zaya": {"num_experts_per_tok": 1},  # the only value it supports
    "dots3_note_text": {"num_key_value_heads": 4},  # must equal the query heads
    # DeepSeek sparse attention: the indexer expects one KV head per query head.
    "axk2": {"num_key_value_heads": 4},
    "deepseek_v32": {"num_key_value_heads": 4},
    "glm_moe_dsa": {"num_key_value_heads": 4},
    # Its default rope parameters lack the per-layer-type entries its model reads.
    "cohere_compass_text": {
        "layer_types": ["full_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    },
    # Learned prompt tokens are prepended inside the model, so with prompt_length > 0 its
    # blocks see more positions than input_ids has (see NOTES).
    "cpmant": {"dim_head": 16, "dim_ff": 128, "position_bias_num_buckets": 32, "prompt_length": 0},
    "dbrx": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 128,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10_000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    },
    # Per-layer embeddings and shared-KV layers are sized for 30+ blocks.
    "gemma3n_text": {
        "vocab_size_per_layer_input": 96,
        "hidden_size_per_layer_input": 8,
        "num_kv_shared_layers": 0,
        "laurel_rank": 8,
        "intermediate_size": 128,
    },
    "gemma4_text": {"vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0, "num_centroids": 16},
    "inkling_text": _INKLING_SWA,
    "inkling2_text": {**_INKLING_SWA, "unpadded_vocab_size": 96},
    "inkling2_loop_text": {**_INKLING_SWA, "unpadded_vocab_size": 96},
    "kimi_linear": {
        "linear_head_dim": 16,
        "linear_num_heads": 4,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "qwen4_exp_text": {
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "indexed_attention"],
        "indexer_n_heads": 4,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
}
"""Per-model config changes the generic sizes cannot express (layer patterns, ratios)."""

_ENC_DEC = "not decoder-only: the decoder half of an encoder-decoder model (it cross-attends to an encoder)"
_ENCODER = "not decoder-only: a bidirectional encoder (masked LM) with an LM head run as a decoder"
_DRAFTER = (
    "speculative-decoding drafter: ignores input_ids; its forward needs the target model's "
    "embeddings and shared KV states"
)


def _multimodal(text: str) -> str:
    return f"multimodal wrapper (vision/audio towers, composite config); {text}"


SKIPPED: dict[str, str] = {
    **dict.fromkeys(
        ["bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
         "pegasus", "plbart", "prophetnet", "trocr", "whisper"],
        _ENC_DEC,
    ),
    **dict.fromkeys(["musicgen", "musicgen_melody"], _ENC_DEC + "; input_ids are audio codes"),
    **dict.fromkeys(
        ["bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
         "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
         "xlm-roberta", "xlm-roberta-xl", "xmod"],
        _ENCODER,
    ),
    "xlm": _ENCODER + "; its layers are not modules (attention and FFN sit in separate lists)",
    "xlnet": "not decoder-only: a permutation LM (two-stream attention, no causal blocks)",
    "reformer": (
        "pads every sequence inside the model to a multiple of its chunk length, so its blocks "
        "see more positions than input_ids has (and training needs such lengths)"
    ),
    "hrm_text": (
        "hierarchical recurrent model: two block stacks, each run for several cycles per "
        "forward pass, so a block's codes come once per cycle"
    ),
    "gemma4_assistant": _DRAFTER,
    "gemma4_unified_assistant": _DRAFTER,
    **{
        t: _multimodal(f"its text decoder is checked as `{text}`")
        for t, text in [
            ("dots3_note", "dots3_note_text"), ("gemma3", "gemma3_text"),
            ("gemma3n", "gemma3n_text"), ("gemma4", "gemma4_text"),
            ("gemma4_unified", "gemma4_unified_text"), ("llama4", "llama4_text"),
            ("qwen3_5", "qwen3_5_text"), ("qwen3_5_moe", "qwen3_5_moe_text"),
            ("qwen4_exp", "qwen4_exp_text"), ("fuyu", "persimmon"), ("got_ocr2", "qwen2"),
            ("phi4_multimodal", "phi3"),
        ]
    },
    "blt": (
        "byte latent transformer: a patcher and local encoder / global / local decoder "
        "sub-models, each from its own sub-config"
    ),
    "emu3": _multimodal("a VQ image tokenizer config around a Llama-style decoder"),
    "git": _multimodal("an image encoder feeding a BERT-style decoder"),
    "mllama": _multimodal("its text model interleaves cross-attention-to-image layers"),
    "moss_transcribe_diarize": _multimodal("speech encoder + text decoder"),
}  # fmt: skip
"""``model_type -> why`` it is not checked."""

NOTES: dict[str, str] = {
    "cpmant": (
        "checked with `prompt_length=0`: with learned prompt tokens (the released models have "
        "32) the blocks see more positions than `input_ids`, and named placements raise a "
        "ValueError saying so; use `modules=[...]` globs there"
    ),
    "dory": (
        "checked without looped blocks: with `n_recurrent_loops > 1` a looped block runs "
        "several times per forward pass and records its codes once per run"
    ),
    "longcat_flash": (
        "each decoder layer runs two attention sub-layers; `modules=['model.layers.*.self_attn.*']` "
        "puts a codebook on each"
    ),
}
"""Caveats shown under the table, where the tiny config differs from released models'."""

MAX_PARAMS = 3_000_000
"""A tiny config that still builds a larger model is refused before any memory is used."""

BATCH, SEQ, NUM_CODES, K = 2, 5, 16, 2
"""Input shape and codebook size of the checks."""


def causal_lm_types() -> list[str]:
    """Every ``model_type`` with a causal-LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def checked_types() -> list[str]:
    """``causal_lm_types()`` minus ``SKIPPED``."""
    return [t for t in causal_lm_types() if t not in SKIPPED]


def _settable(cfg: Any, key: str) -> bool:
    prop = getattr(type(cfg), key, None)
    if isinstance(prop, property) and prop.fset is None:
        return False  # derived, e.g. FalconConfig.head_dim
    return key in cfg.to_dict() or hasattr(cfg, key)


def tiny_config(model_type: str) -> Any:
    """``AutoConfig.for_model(model_type, ...)`` with ``TINY_SIZES`` and ``OVERRIDES`` applied."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in TINY_SIZES.items() if _settable(default, k)}
    vocab = kw.get("vocab_size", TINY_SIZES["vocab_size"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(default, key, None)
        if isinstance(v, int) and v >= vocab:
            kw[key] = 0  # a special token id past the tiny vocabulary
    if "qk_rope_head_dim" in kw and "head_dim" in kw:
        kw["head_dim"] = kw["qk_rope_head_dim"]  # MLA: rotary embeddings span the rope part
    kw.update(OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``model_type`` in eval mode (seeded).

    ``ValueError`` if the tiny config still gives more than ``MAX_PARAMS`` parameters (counted
    on the meta device, before any memory is allocated).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    except (NotImplementedError, RuntimeError):
        # Some versions' modules read a tensor's value while building (e.g. ``.item()``),
        # which the meta device cannot answer: count after the real build instead.
        n = -1
    if n > MAX_PARAMS:
        raise ValueError(
            f"model_type={model_type!r}: the tiny config still has {n:,} parameters "
            f"(> {MAX_PARAMS:,}); add its size fields to OVERRIDES"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if n < 0 and (n := sum(p.numel() for p in model.parameters())) > MAX_PARAMS:
        raise ValueError(
            f"model_type={model_type!r}: the tiny config still has {n:,} parameters "
            f"(> {MAX_PARAMS:,}); add its size fields to OVERRIDES"
        )
    model.eval()
    return model


@dataclass
class PlacementCheck:
    """One placement on one architecture: why it is unavailable, or what was measured."""

    placement: str
    error: str = ""
    """The ``ValueError`` that attaching raised ('' when the codebooks attached)."""
    codebooks: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    """Hooked module of each codebook, relative to its block."""
    code_shapes: dict[str, list[int]] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    changes_logits: bool = False
    """Codes on: logits differ from the base model's."""
    off_identical: bool = False
    """``model.disabled()``: logits bit-identical to the base model's."""
    detach_identical: bool = False
    """After ``detach()``: logits bit-identical to the base model's."""

    @property
    def attached(self) -> bool:
        return not self.error


@dataclass
class ArchitectureCheck:
    """Every check on one ``model_type``."""

    model_type: str
    model_class: str = ""
    num_heads: int = 0
    """Query heads in the model's config."""
    num_blocks: int = 0
    build_error: str = ""
    """Why the tiny model could not be built or run ('' when it could)."""
    placements: dict[str, PlacementCheck] = field(default_factory=dict)
    round_trip_identical: bool = False
    """save_pretrained -> from_pretrained: same codebooks and bit-identical logits."""
    codebooks_trained: list[str] = field(default_factory=list)
    """Codebooks that one AdamW step on loss + codebook_loss changed."""
    error: str = ""
    """An unexpected exception during the checks ('' when none)."""
    upstream_error: str = ""
    """Where the save / load round trip fails in transformers itself, without codebooks."""


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().clone()  # type: ignore[no-any-return]


def _relative(module: str, prefix: str) -> str:
    """``model.layers.3.self_attn.o_proj`` -> ``self_attn.o_proj`` ('' for the block)."""
    head = f"{prefix}."
    if not module.startswith(head):
        return module
    rest = module[len(head) :].split(".", 1)
    return rest[1] if len(rest) > 1 else ""


def _check_placement(
    base: nn.Module, placement: str, ids: torch.Tensor, ref: torch.Tensor, prefix: str
) -> PlacementCheck:
    result = PlacementCheck(placement)
    cfg = CodebookConfig(num_codes=NUM_CODES, k=K, placements=[placement])
    try:
        model = attach_codebooks(base, cfg)
    except ValueError as e:
        result.error = str(e)
        return result
    try:
        result.codebooks = list(model.codebooks)
        result.modules = [_relative(s.module, prefix) for s in model.sites]
        result.widths = {s.name: s.dim for s in model.sites}
        with model.record_codes() as rec:
            on = _logits(model, ids)
        result.code_shapes = {n: list(c.shape) for n, c in rec.codes.items()}
        result.changes_logits = on.shape == ref.shape and not torch.equal(on, ref)
        with model.disabled():
            result.off_identical = torch.equal(_logits(model, ids), ref)
    finally:
        model.detach()
    result.detach_identical = torch.equal(_logits(base, ids), ref)
    return result


def _check_round_trip_and_training(
    base: nn.Module, placements: list[str], ids: torch.Tensor, result: ArchitectureCheck
) -> None:
    model = attach_codebooks(base, CodebookConfig(num_codes=NUM_CODES, k=K, placements=placements))
    with tempfile.TemporaryDirectory(prefix="codebook-arch-") as tmp:
        try:
            saved = model.save_pretrained(Path(tmp) / "m")
            loaded = CodebookModel.from_pretrained(saved, local_files_only=True)
            loaded.eval()
            result.round_trip_identical = list(loaded.codebooks) == list(model.codebooks) and (
                torch.equal(_logits(loaded, ids), _logits(model, ids))
            )
        except Exception:
            if not (upstream := _hf_round_trip_problem(model, ids, Path(tmp) / "hf")):
                raise
            result.upstream_error = upstream
        if not result.round_trip_identical and not result.upstream_error:
            result.upstream_error = _hf_round_trip_problem(model, ids, Path(tmp) / "hf")
    before = {n: cb.codebook.detach().clone() for n, cb in model.codebooks.items()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + model.codebook_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    result.codebooks_trained = [
        n for n, cb in model.codebooks.items() if not torch.equal(cb.codebook, before[n])
    ]
    model.detach()


def _hf_round_trip_problem(model: CodebookModel, ids: torch.Tensor, path: Path) -> str:
    """Why transformers' own save / load of the bare base model does not give back its logits
    ('' when it does): tells a failure of this transformers version from one of ours."""
    from transformers import AutoModelForCausalLM

    with model.disabled():
        try:
            model.base.save_pretrained(path)  # type: ignore[operator]
            hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
            same = torch.equal(_logits(hf, ids), _logits(model.base, ids))
        except Exception as e:
            return f"transformers' own save_pretrained / from_pretrained fails: {type(e).__name__}: {e}"
    return "" if same else "transformers' own save_pretrained / from_pretrained changes the logits"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tiny random models make transformers warn about many harmless things."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_architecture(model_type: str, seed: int = 0) -> ArchitectureCheck:
    """Build a tiny ``model_type`` model and run every check on it (see the module doc)."""
    result = ArchitectureCheck(model_type)
    with _quiet():
        try:
            base = tiny_model(model_type, seed=seed)
            gen = torch.Generator().manual_seed(seed)
            vocab = int(base.get_input_embeddings().num_embeddings)  # type: ignore[operator]
            ids = torch.randint(1, vocab, (BATCH, SEQ), generator=gen)
            ref = _logits(base, ids)
        except Exception as e:  # the tiny model itself does not build or run
            result.build_error = f"{type(e).__name__}: {e}"
            return result
        result.model_class = type(base).__name__
        cfg = text_config(base)
        result.num_heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        try:
            prefix, blocks = find_blocks(base)
            result.num_blocks = len(blocks)
            for p in PLACEMENTS:
                result.placements[p] = _check_placement(base, p, ids, ref, prefix)
            ok = [p for p in PLACEMENTS if result.placements[p].attached]
            if ok:
                _check_round_trip_and_training(base, ok, ids, result)
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
    return result


def check_architectures(
    model_types: Sequence[str] | None = None, *, progress: bool = True
) -> list[ArchitectureCheck]:
    """``check_architecture`` on every checked type (or on ``model_types``), in order."""
    types = checked_types() if model_types is None else list(model_types)
    known = set(causal_lm_types())
    for t in types:
        if t not in known:
            near = difflib.get_close_matches(t, sorted(known), n=5)
            raise ValueError(
                f"model_type={t!r} is not a causal-LM architecture of the installed transformers"
                f" ({_versions()['transformers']}); close matches: {near or 'none'}"
            )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose time to thread hand-offs
    try:
        return [
            check_architecture(t)
            for t in tqdm(types, desc="architectures", unit="model", disable=not progress)
        ]
    finally:
        torch.set_num_threads(threads)


def _versions() -> dict[str, str]:
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def cell(check: ArchitectureCheck, placement: str) -> str:
    """``"yes"`` (with the blocks, on hybrids where only some have it), or why not."""
    if check.build_error:
        return "not built: " + check.build_error
    if check.error:
        return "FAILED: " + check.error
    pc = check.placements[placement]
    if not pc.attached:
        return "no: " + _short_reason(pc.error)
    failed = [
        what
        for what, ok in (
            ("codes shape", _shapes_ok(pc)),
            ("codes change logits", pc.changes_logits),
            ("off = base", pc.off_identical),
            ("detach = base", pc.detach_identical),
            ("save/load", check.round_trip_identical),
            ("training", set(pc.codebooks) <= set(check.codebooks_trained)),
        )
        if not ok
    ]
    if failed:
        return "FAILED: " + ", ".join(failed)
    blocks = sorted({int(n.split(".")[1]) for n in pc.codebooks})
    if len(blocks) < check.num_blocks:
        return f"yes (blocks {', '.join(map(str, blocks))} of {check.num_blocks})"
    return "yes"


def _shapes_ok(pc: PlacementCheck) -> bool:
    """``(batch, seq, heads, k)`` for ``attn_heads``, ``(batch, seq, k)`` otherwise."""
    if set(pc.code_shapes) != set(pc.codebooks):
        return False
    for shape in pc.code_shapes.values():
        head = shape[2:3] if pc.placement == "attn_heads" else []
        if shape != [BATCH, SEQ, *head, K] or (pc.placement == "attn_heads" and len(shape) != 4):
            return False
    return True


def _short_reason(error: str) -> str:
    """The why of an attach error, without the advice and the repeated model name."""
    text = error.split("): ", 1)[1] if error.startswith("placement ") else error
    text = text.split(", in every block. Instead", 1)[0].split(" (looked for ", 1)[0]
    text = re.sub(r"^codebook \S+: ", "", text)
    text = re.sub(r" of \w+ \(model_type '[^']*'\)", "", text)
    return text.split("; placement ", 1)[0].replace("|", "/")


def _hooks(check: ArchitectureCheck) -> str:
    parts = []
    for p in PLACEMENTS:
        pc = check.placements.get(p)
        if pc is None or not pc.attached or p == "residual":
            continue
        first = pc.codebooks[0]
        module = pc.modules[0]
        if p == "attn_heads":
            heads = pc.code_shapes[first][2]
            parts.append(f"heads: `{module}` in ({heads} x {pc.widths[first] // heads})")
        else:
            parts.append(f"{p.split('_')[0]}: `{module}`")
    return "; ".join(parts)


def architectures_markdown(
    checks: Sequence[ArchitectureCheck], skipped: dict[str, str] | None = None
) -> str:
    """The table of ``docs/architectures.md``: one row per architecture, one column per
    placement (``yes`` or why not), the hooked modules, and the skipped types with reasons."""
    skipped = SKIPPED if skipped is None else skipped
    v = _versions()
    lines = [
        "# Architectures",
        "",
        "Generated by `codebook-lens architectures --write docs/architectures.md` with "
        f"transformers {v['transformers']} (`tests/test_architectures.py` runs the same "
        "checks and compares this file with their results).",
        "",
        "Every causal-LM `model_type` of that transformers version is built as a tiny random "
        "model (`AutoConfig.for_model(model_type, ...)`: 2 blocks, width 64, 4 query heads, "
        "grouped-query attention and 4 experts where the config has them; "
        "`codebook_lens.model.architecture_checks.tiny_config`). "
        "For each placement: codebooks attach, codes have the documented shapes "
        "(`(batch, seq, heads, k)` for `attn_heads`, `(batch, seq, k)` otherwise), codes "
        "change the logits, and codebooks off (`model.disabled()`) or detached give logits "
        "bit-identical to the base model. With all available placements at once: "
        "`save_pretrained` / `from_pretrained` gives bit-identical logits and one AdamW step "
        "on `loss + codebook_loss()` changes every codebook. `yes` means all of that holds; "
        "`yes (blocks ...)` on hybrid models, where only those blocks have the component; "
        "otherwise the cell says why not. The last column names the hooked module of the "
        "first such block, relative to the block (`in`: its input is quantized; the numbers "
        "are heads x head width).",
        "",
        "| model_type | class | " + " | ".join(f"`{p}`" for p in PLACEMENTS) + " | hooked |",
        "|---|---|" + "---|" * len(PLACEMENTS) + "---|",
    ]
    for c in sorted(checks, key=lambda c: c.model_type):
        cells = [cell(c, p) for p in PLACEMENTS]
        lines.append(
            f"| `{c.model_type}` | {c.model_class or '-'} | "
            + " | ".join(cells)
            + f" | {_hooks(c)} |"
        )
    n_yes = sum(all(cell(c, p).startswith("yes") for p in PLACEMENTS) for c in checks)
    lines += ["", f"{len(checks)} architectures checked; all four placements on {n_yes}."]
    checked = {c.model_type for c in checks}
    notes = [f"- `{t}`: {NOTES[t]}." for t in sorted(NOTES) if t in checked]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "## Not checked", "", "| model_type | why |", "|---|---|"]
    present = set(causal_lm_types())
    for t in sorted(skipped):
        if t in present:
            lines.append(f"| `{t}` | {skipped[t]} |")
    return "\n".join(lines) + "\n"


def check_doc_path(path: str | os.PathLike[str]) -> Path:
    """``FileNotFoundError`` unless ``path``'s folder exists (and ``path`` is no folder)."""
    out = Path(path)
    if out.is_dir():
        raise FileNotFoundError(
            f"--write {out}: is a folder; give a file path such as {out}/architectures.md"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--write {out}: folder {out.parent} does not exist")
    return out


def write_architectures_doc(
    path: str | os.PathLike[str], checks: Sequence[ArchitectureCheck]
) -> Path:
    """Write ``architectures_markdown(checks)`` to ``path`` atomically."""
    out = check_doc_path(path)
    write_bytes_atomic(out, architectures_markdown(checks).encode("utf-8"))
    return out
