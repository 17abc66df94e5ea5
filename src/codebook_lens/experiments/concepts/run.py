"""Run the concept battery end to end (``run_concepts``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from codebook_lens.codes.analysis import site_activations
from codebook_lens.codes.cache import CodeCache, build_cache, check_identity, load_cache
from codebook_lens.codes.search import code_contexts
from codebook_lens.config import write_json_atomic
from codebook_lens.experiments.concepts.battery import (
    Concept,
    builtin_battery_path,
    concept_positions,
    load_battery,
)
from codebook_lens.experiments.concepts.config import ConceptsConfig
from codebook_lens.experiments.concepts.controls import kmeans_like, module_activations
from codebook_lens.experiments.concepts.report import write_concepts_report
from codebook_lens.experiments.concepts.scoring import (
    ConceptResult,
    SiteCodes,
    score_concepts,
    summarize,
)
from codebook_lens.experiments.topics import (
    TopicsConfig,
    interleave,
    prepare_model_and_cache,
    split_corpus,
)
from codebook_lens.model.codebook_model import CodebookModel, HookSite
from codebook_lens.training.data import load_documents


@dataclass
class Prepared:
    """What the battery is scored on, and where the models came from."""

    model: Any
    cache: CodeCache
    base: nn.Module | None
    model_source: str
    base_source: str


def prepare(cfg: ConceptsConfig, out: Path) -> Prepared:
    """The codebook model, its cache and the base model: reused, or trained like
    ``experiment topics`` (same sizes, same splits) into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(cfg.topics_run) if cfg.topics_run is not None else None
    if run is not None and not (run / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"topics_run={str(run)!r}: no model/ in it (run `codebook-lens experiment topics "
            f"--out {run}` first)"
        )
    model_dir = cfg.model or (str(run / "model") if run is not None else None)
    if model_dir is None:
        tcfg = TopicsConfig(
            out=str(out), data=cfg.data, quick=cfg.quick, seed=cfg.seed, device=cfg.device
        )
        tcfg.progress = cfg.progress
        splits = split_corpus(tcfg)
        out.mkdir(parents=True, exist_ok=True)
        model, _, trained_base, source, cache = prepare_model_and_cache(tcfg, splits.lm, out)
        return Prepared(model, cache, trained_base, source, str(out / "base"))
    model = CodebookModel.from_pretrained(model_dir, device=cfg.device).eval()
    cache_dir = cfg.cache or (str(run / "cache") if run is not None and cfg.model is None else None)
    if cache_dir is not None:
        cache = load_cache(cache_dir)
        check_identity(cache, model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception:
            raise FileNotFoundError(
                f"model={model_dir!r}: no tokenizer saved with it; save the model with "
                "save_pretrained(dir, tokenizer=...)"
            ) from None
        docs = interleave(load_documents(cfg.data))
        cache = build_cache(
            model,
            tokenizer,
            docs,
            out / "cache",
            max_tokens=cfg.max_tokens,
            overwrite=True,
            progress=cfg.progress,
            source=cfg.data,
        )
    base_dir = cfg.base or (
        str(run / "base") if run is not None and (run / "base").is_dir() else None
    )
    base: nn.Module | None = None
    base_source = "the codebook model with its codebooks switched off (no base model given)"
    if base_dir is not None:
        if not Path(base_dir).is_dir():
            raise FileNotFoundError(f"base={base_dir!r}: no such model folder")
        loaded: Any = AutoModelForCausalLM.from_pretrained(base_dir)
        base = loaded.to(cfg.device).eval()
        base_source = base_dir
    return Prepared(model, cache, base, model_dir, base_source)


def run_concepts(cfg: ConceptsConfig) -> dict[str, Any]:
    """Run the battery; writes report.md/report.html/metrics.json, returns the metrics."""
    started = time.perf_counter()
    out = Path(cfg.out)
    battery = load_battery(cfg.concepts)  # bad battery: fail before any work
    prep = prepare(cfg, out)  # bad model / cache / base: fail before writing anything
    out.mkdir(parents=True, exist_ok=True)
    model, cache = prep.model, prep.cache
    n = min(cfg.max_tokens, cache.n_tokens)
    concepts, positions, skipped = locate_concepts(cfg, battery, cache, n)
    sites = [s for s in model.sites if s.name in cache.codebooks]
    trained, acts, control = site_units(cfg, prep, sites, n)
    results = score_concepts(
        concepts,
        positions,
        n,
        trained,
        activations=acts,
        control=control,
        min_precision=cfg.min_precision,
        min_count=cfg.min_count,
    )
    add_contexts(results, cache, cfg.contexts)
    summary = summarize(results, min_precision=cfg.min_precision, min_recall=cfg.min_recall)
    metrics: dict[str, Any] = {
        "model": prep.model_source,
        "base": prep.base_source,
        "cache": str(cache.path),
        "n_tokens": n,
        "battery": str(cfg.concepts or builtin_battery_path()),
        "codebooks": [
            {"name": s.name, "placement": s.placement, "groups": s.groups, "dim": s.dim}
            for s in sites
        ],
        "summary": summary,
        "concepts": {r.name: r.to_dict() for r in results},
        "skipped": skipped,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_concepts_report(cfg, metrics, results, out)
    return metrics


def locate_concepts(
    cfg: ConceptsConfig, battery: Sequence[Concept], cache: CodeCache, n: int
) -> tuple[list[Concept], dict[str, np.ndarray], list[dict[str, Any]]]:
    """The concepts occurring on >= ``cfg.min_tokens`` of the first ``n`` tokens, their
    positions, and the skipped ones with the reason; ``ValueError`` when none occurs."""
    positions: dict[str, np.ndarray] = {}
    skipped: list[dict[str, Any]] = []
    for c in battery:
        p = concept_positions(cache, c, timeout=cfg.regex_timeout)
        m = int((p < n).sum())
        if m < cfg.min_tokens:
            why = (
                f"document label {c.query!r} not in the cache"
                if c.kind == "docs" and m == 0
                else f"occurs on {m} of the {n} evaluated tokens (< min_tokens={cfg.min_tokens})"
            )
            skipped.append({"name": c.name, "reason": why})
            continue
        positions[c.name] = p
    concepts = [c for c in battery if c.name in positions]
    if not concepts:
        raise ValueError(
            f"no concept of the battery occurs on >= min_tokens={cfg.min_tokens} of the {n} "
            "evaluated tokens; lower --min-tokens or use more tokens"
        )
    return concepts, positions, skipped


def site_units(
    cfg: ConceptsConfig, prep: Prepared, sites: Sequence[HookSite], n: int
) -> tuple[dict[str, SiteCodes], dict[str, np.ndarray], dict[str, SiteCodes]]:
    """Per site, on the first ``n`` tokens: the trained codes, the codebook's input
    activations (the neurons) and the k-means control codes of the base model."""
    model, cache = prep.model, prep.cache
    trained: dict[str, SiteCodes] = {}
    acts: dict[str, np.ndarray] = {}
    control: dict[str, SiteCodes] = {}
    bar = tqdm(sites, desc="sites", disable=not cfg.progress)
    for site in bar:
        info = cache.info(site.name)
        layer = model.codebooks[site.name]
        trained[site.name] = SiteCodes(
            np.asarray(cache.codes(site.name)[:n]), info.num_codes, info.grouped
        )
        acts[site.name] = site_activations(model, cache, site.name, max_tokens=n)
        if prep.base is not None:
            base_acts = module_activations(prep.base, cache, site.module, site.hook, max_tokens=n)
        else:
            with model.disabled():
                base_acts = module_activations(
                    model.base, cache, site.module, site.hook, max_tokens=n
                )
        ctrl_codes = kmeans_like(
            layer, base_acts, fit_tokens=cfg.kmeans_tokens, iters=cfg.kmeans_iters, seed=cfg.seed
        )
        del base_acts
        control[site.name] = SiteCodes(ctrl_codes, layer.num_codes, info.grouped)
    bar.close()
    return trained, acts, control


def add_contexts(results: Sequence[ConceptResult], cache: CodeCache, n: int) -> None:
    """Set each result's ``contexts``: up to ``n`` places where its best code fires."""
    for r in results:
        if r.code is not None:
            ctx = code_contexts(cache, r.code.codebook, r.code.code, r.code.head, n=n, window=40)
            r.contexts = [x.render() for x in ctx]
