"""The topic experiment's codebook model, its plain base LM and its code cache, trained once
under the output folder and reused while the settings that determine them are unchanged."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from codebook_lens.codes.cache import CodeCache, build_cache, load_cache
from codebook_lens.config import read_json, write_json_atomic
from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.experiments.topics.corpus import interleave
from codebook_lens.model.codebook_model import CodebookModel
from codebook_lens.model.tokenizer import load_tokenizer
from codebook_lens.training.data import BatchStream, Document, pack_tokens
from codebook_lens.training.loop import TrainConfig
from codebook_lens.training.pipeline import fine_tune_codebooks, pretrain_base


class TopicModels(NamedTuple):
    """The models of the experiment."""

    model: CodebookModel
    """The codebook model (eval mode)."""
    tokenizer: Any
    base: nn.Module | None
    """The plain base LM; ``None`` for a given codebook model (then its codebooks off)."""
    source: str
    """Where the codebook model came from (``(reused)`` when loaded from an earlier run)."""


def prepare_model(cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path) -> TopicModels:
    """The codebook model, its tokenizer, the plain base LM (``None`` when a saved codebook
    model is given: then the fluency check uses it with codebooks off), and where it came from.

    Training: pretrain a small LM from scratch on ``lm_docs`` (``pipeline.pretrain_base``), then
    attach codebooks to every attention head of a copy and fine-tune
    (``pipeline.fine_tune_codebooks``).
    Both are saved under ``out`` and reused when ``cfg.model_key()`` matches.
    """
    if cfg.model is not None:
        return load_given_model(cfg)
    saved = load_saved_model(cfg, out)
    if saved is not None:
        return saved
    reuse_base = base_is_saved(cfg, out)
    remove_stale(out, reuse_base=reuse_base)
    if reuse_base:
        base, tokenizer, blocks = load_saved_base(cfg, lm_docs, out)
    else:
        base, tokenizer, blocks = pretrain(cfg, lm_docs, out)
    base.eval()
    model = fine_tune(cfg, base, blocks, out)
    model.save_pretrained(out / "model", tokenizer=tokenizer)
    write_json_atomic(out / "model_key.json", cfg.model_key())
    return TopicModels(model, tokenizer, base, str(out / "model"))


def load_given_model(cfg: TopicsConfig) -> TopicModels:
    """``cfg.model`` (a saved codebook model) with the tokenizer saved beside it."""
    from transformers import AutoTokenizer

    assert cfg.model is not None
    model = CodebookModel.from_pretrained(cfg.model, device=cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except Exception:
        raise FileNotFoundError(
            f"model={cfg.model!r}: no tokenizer saved with it; save the model with "
            "save_pretrained(dir, tokenizer=...)"
        ) from None
    return TopicModels(model.eval(), tokenizer, None, str(cfg.model))


def load_saved_model(cfg: TopicsConfig, out: Path) -> TopicModels | None:
    """The models saved under ``out`` by an earlier run with the same ``cfg.model_key()``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, key_file = out / "model", out / "model_key.json"
    if not (
        key_file.is_file()
        and read_json(key_file) == cfg.model_key()
        and (model_dir / "config.json").is_file()
    ):
        return None
    model = CodebookModel.from_pretrained(model_dir, device=cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    loaded: nn.Module = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    loaded.to(torch.device(cfg.device))
    return TopicModels(model.eval(), tokenizer, loaded.eval(), f"{model_dir} (reused)")


def base_is_saved(cfg: TopicsConfig, out: Path) -> bool:
    """Whether ``out/base`` holds the base LM of ``cfg.base_key()`` with its tokenizer."""
    base_dir, base_key_file = out / "base", out / "base_key.json"
    return (
        base_key_file.is_file()
        and read_json(base_key_file) == cfg.base_key()
        and (base_dir / "config.json").is_file()
        and (base_dir / "tokenizer.json").is_file()
    )


def remove_stale(out: Path, *, reuse_base: bool) -> None:
    """Delete what an earlier run with other settings left: the codebook model and its
    training folder, and the base LM's too unless it is reused."""
    stale_paths = [out / "model", out / "model_key.json", out / "train_codebooks"]
    if not reuse_base:
        stale_paths += [out / "base", out / "base_key.json", out / "train_base"]
    for stale in stale_paths:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()


def training(cfg: TopicsConfig, stage: TrainConfig) -> TrainConfig:
    """A stage's ``TrainConfig`` as run: warmup at most a tenth of its steps, the experiment's
    seed and progress bars."""
    warmup = min(stage.warmup_steps, stage.steps // 10)
    return replace(stage, warmup_steps=warmup, seed=cfg.seed, progress=cfg.progress)


def load_saved_base(
    cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path
) -> tuple[nn.Module, Any, Tensor]:
    """The base LM and tokenizer saved in ``out/base``, and ``lm_docs`` packed into blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
    base: nn.Module = AutoModelForCausalLM.from_pretrained(str(out / "base"))
    base.to(torch.device(cfg.device))
    return base, tokenizer, pack_tokens(lm_docs, tokenizer, cfg.block_size)


def pretrain(
    cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path
) -> tuple[nn.Module, Any, Tensor]:
    """Train a tokenizer and a small GPT-2 from scratch on ``lm_docs``; save both to
    ``out/base`` with ``cfg.base_key()``. Returns the LM, the tokenizer and the packed blocks."""
    tokenizer = load_tokenizer(cfg.lm.tokenizer, lm_docs)
    mcfg = replace(cfg.lm, context=max(cfg.block_size, cfg.lm.context))
    blocks = pack_tokens(lm_docs, tokenizer, cfg.block_size)
    pre = training(cfg, cfg.pretrain)
    batches = BatchStream(blocks, pre.batch_size, seed=cfg.seed)
    device = torch.device(cfg.device)
    base = pretrain_base(mcfg, tokenizer, batches, pre, out / "train_base", device=device).model
    tmp = out / f".base.tmp-{os.getpid()}"
    base.save_pretrained(tmp)  # type: ignore[operator]
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, out / "base")
    write_json_atomic(out / "base_key.json", cfg.base_key())
    return base, tokenizer, blocks


def fine_tune(cfg: TopicsConfig, base: nn.Module, blocks: Tensor, out: Path) -> CodebookModel:
    """A copy of ``base`` with ``cfg.codebooks``, k-means initialised and
    fine-tuned on ``blocks`` (in eval mode on return)."""
    cb_cfg = replace(cfg.codebooks, seed=cfg.seed)
    fine = training(cfg, cfg.finetune)
    batches = BatchStream(blocks, fine.batch_size, seed=cfg.seed + 1)
    trained = fine_tune_codebooks(
        copy.deepcopy(base), cb_cfg, batches, fine, out / "train_codebooks"
    )
    assert isinstance(trained.model, CodebookModel)
    return trained.model.eval()


def prepare_model_and_cache(
    cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path
) -> tuple[CodebookModel, Any, nn.Module | None, str, CodeCache]:
    """``prepare_model`` plus the code cache of ``cfg.cache_tokens`` tokens of ``lm_docs``
    (round-robin over topics) in ``out/cache``; the cache is a pure function of the model and
    these settings, so it is reused when they match (``experiment concepts`` shares it)."""

    model, tokenizer, base, model_source = prepare_model(cfg, lm_docs, out)
    cache_key = {
        "model": cfg.model_key() if cfg.model is None else cfg.model,
        "cache_tokens": cfg.cache_tokens,
        "block_size": cfg.block_size,
    }
    key_file = out / "cache_key.json"
    if (
        model_source.endswith("(reused)")
        and key_file.is_file()
        and read_json(key_file) == cache_key
        and (out / "cache" / "manifest.json").is_file()
    ):
        return model, tokenizer, base, model_source, load_cache(out / "cache")
    key_file.unlink(missing_ok=True)
    cache = build_cache(
        model,
        tokenizer,
        interleave(lm_docs),
        out / "cache",
        max_tokens=cfg.cache_tokens,
        seq_len=cfg.block_size,
        overwrite=True,
        progress=cfg.progress,
        source=cfg.data,
    )
    write_json_atomic(key_file, cache_key)
    return model, tokenizer, base, model_source, cache
