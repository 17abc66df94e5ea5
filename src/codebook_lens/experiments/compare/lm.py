"""The LM workload: the topic experiment's BBC language model, every method at the attention
output of each layer (the heads' concatenated outputs, where the paper's head codebooks sit).

The models are a finished ``experiment topics`` run's (``lm_run``), or trained here by the
topic experiment's own code into ``<out>/lm_topics``. Matched per layer: the fine-tuned model
has one codebook per head (C codes, k per token each), so every post-hoc method gets
``heads x C`` latents and L0 ``heads x k`` on the layer's ``heads x head_dim`` activation; the
post-hoc codebook and the k-means control keep the head structure (one codebook per head).

Data: the post-hoc methods are fitted to the frozen base LM's activations on blocks of the
LM's own training documents (new blocks and initialisation at each seed); learning rates are
chosen on the development seed against validation blocks; everything is scored on documents
neither the LM nor any method saw (the topic experiment's held-out articles), through a code
cache of the codebook model over them:

- the concept battery (``experiment concepts``' built-in one): per concept the best latent by
  F1 over the layers, its precision and recall;
- explained variance, L0 and the dead fraction on every scored token;
- the CE-loss score as SAELens's ``evals.py`` defines it (zero ablation of the site), one layer
  spliced at a time, and the plain CE increase.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebook_lens.codes.analysis import site_activations, window_inputs
from codebook_lens.codes.cache import CodeCache, build_cache, load_cache
from codebook_lens.codes.saes import CodebookDictionary, Dictionary, hook_site
from codebook_lens.config import config_from_dict, read_json, write_json_atomic
from codebook_lens.experiments.compare.config import CompareConfig
from codebook_lens.experiments.compare.methods import (
    TRAINED,
    FitSpec,
    explained_variance,
    fit,
    sweep,
)
from codebook_lens.experiments.compare.tokfsm import FINETUNED, Progress, capture
from codebook_lens.experiments.concepts.battery import concept_positions, load_battery
from codebook_lens.experiments.concepts.config import ConceptsConfig
from codebook_lens.experiments.concepts.controls import module_activations
from codebook_lens.experiments.concepts.scoring import SiteCodes, score_concepts
from codebook_lens.experiments.topics import TopicsConfig, interleave, split_corpus
from codebook_lens.experiments.topics.model import load_saved_model, prepare_model
from codebook_lens.model.codebook_model import CodebookModel, HookSite, eval_mode
from codebook_lens.training.data import pack_tokens

VAL_BLOCKS_SHARE = 0.1
"""Share of the LM's training blocks kept apart for choosing learning rates."""


@dataclass
class LMRun:
    """A topic-experiment run's models, sites and data."""

    folder: Path
    topics: TopicsConfig
    model: CodebookModel
    base: nn.Module
    tokenizer: Any
    sites: list[HookSite]
    """The codebook model's head sites, one per layer (also sites of ``base``)."""
    fit_blocks: Tensor
    """``(B, block_size)`` blocks of the LM's training documents the methods are fitted to."""
    val_blocks: Tensor
    """Other blocks of them: learning-rate choice on the development seed."""
    cache: CodeCache
    """The codebook model's codes over the held-out documents: what is scored."""


def topics_config(cfg: CompareConfig, seed: int) -> TopicsConfig:
    """The topic experiment's settings (its defaults at ``seed``) when the LM is trained here."""
    return TopicsConfig(
        out=str(Path(cfg.out) / "lm_topics" / f"seed_{seed}"), quick=cfg.quick, seed=seed,
        device=cfg.device, progress=False,
    )  # fmt: skip


def saved_topics_config(folder: Path) -> TopicsConfig:
    """The settings of a finished ``experiment topics`` run in ``folder``."""
    metrics = folder / "metrics.json"
    if not (folder / "model" / "config.json").is_file() or not metrics.is_file():
        raise ValueError(
            f"lm_run={str(folder)!r} is invalid: it has no model/ or metrics.json; give the "
            "folder of a finished `codebook-lens experiment topics` run"
        )
    saved = json.loads(metrics.read_text()).get("config", {})
    tcfg = config_from_dict(TopicsConfig, {**saved, "out": str(folder), "progress": False})
    return tcfg


def lm_run(cfg: CompareConfig, seed: int, progress: Progress) -> LMRun:
    """``cfg.lm_run``, or the topic experiment's models at ``seed`` trained into
    ``<out>/lm_topics/seed_<seed>`` (reused while its settings are unchanged); then the blocks
    and the held-out cache."""
    if cfg.lm_run:
        folder = Path(cfg.lm_run)
        tcfg = saved_topics_config(folder)
        splits = split_corpus(tcfg)
        models = load_saved_model(tcfg, folder)
        if models is None or models.base is None:
            raise ValueError(
                f"lm_run={str(folder)!r} is invalid: its model/ or base/ does not match the "
                "settings in its metrics.json; run `codebook-lens experiment topics` into it again"
            )
    else:
        tcfg = topics_config(cfg, seed)
        folder = Path(tcfg.out)
        folder.mkdir(parents=True, exist_ok=True)
        splits = split_corpus(tcfg)
        progress(f"lm: the topic experiment's models in {folder} (trained unless saved)")
        models = prepare_model(tcfg, splits.lm, folder)
    assert models.base is not None
    model, base = models.model.eval(), models.base.eval()
    sites = [s for s in model.sites if s.placement == "attn_heads"]
    if not sites:
        raise ValueError(
            f"lm_run={str(folder)!r}: its codebook model has no attention-head codebooks"
        )
    blocks = pack_tokens(splits.lm, models.tokenizer, tcfg.block_size)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    n_val = max(1, int(VAL_BLOCKS_SHARE * len(blocks)))
    cache = heldout_cache(cfg, tcfg, model, models.tokenizer,
                          [*splits.classifier_train, *splits.classifier_test], folder)  # fmt: skip
    return LMRun(folder, tcfg, model, base, models.tokenizer, sites, blocks[order[n_val:]],
                 blocks[order[:n_val]], cache)  # fmt: skip


def heldout_cache(cfg: CompareConfig, tcfg: TopicsConfig, model: CodebookModel, tokenizer: Any,
                  docs: Sequence[Any], out: Path) -> CodeCache:  # fmt: skip
    """The codebook model's cache over ``cfg.lm_eval_tokens`` tokens of the held-out
    documents (round-robin over topics) in ``<out>/heldout_cache`` (``out``: the run's folder);
    reused when built for the same model and size."""
    folder, key_file = out / "heldout_cache", out / "heldout_cache_key.json"
    key = {"model": tcfg.model_key(), "tokens": cfg.lm_eval_tokens, "block": tcfg.block_size}
    if key_file.is_file() and read_json(key_file) == key and (folder / "manifest.json").is_file():
        return load_cache(folder)
    key_file.unlink(missing_ok=True)
    cache = build_cache(model, tokenizer, interleave(list(docs)), folder,
                        max_tokens=cfg.lm_eval_tokens, seq_len=tcfg.block_size, overwrite=True,
                        progress=False, source=tcfg.data)  # fmt: skip
    write_json_atomic(key_file, key)
    return cache


def lm_spec(cfg: CompareConfig, run: LMRun, site: HookSite, seed: int) -> FitSpec:
    """Per layer: ``heads x C`` latents, L0 ``heads x k`` (or ``lm_num_latents`` / ``lm_k``);
    the post-hoc codebook keeps one codebook per head."""
    layer = run.model.codebooks[site.name]
    groups = layer.groups
    num_latents = cfg.lm_num_latents or groups * layer.num_codes
    k = cfg.lm_k or groups * layer.k
    if num_latents % groups or k % groups:
        groups = 1  # a size that does not split over the heads: one codebook for the layer
    return FitSpec(num_latents, k, cfg.batch_size, seed, cfg.device, groups=groups,
                   similarity=layer.similarity)  # fmt: skip


def capture_blocks(model: nn.Module, sites: Sequence[HookSite], blocks: Tensor
                   ) -> dict[str, Tensor]:  # fmt: skip
    """Each site's activations on ``blocks`` ``(B, L)``, flattened: name -> ``(B * L, d)``."""
    return {
        n: a.reshape(-1, a.shape[-1]) for n, a in capture(model, list(sites), blocks, 32).items()
    }


def fit_sample(run: LMRun, tokens: int, seed: int) -> Tensor:
    """Blocks holding ``tokens`` tokens of the fitting part, drawn by ``seed``."""
    n = min(len(run.fit_blocks), max(1, math.ceil(tokens / run.fit_blocks.shape[1])))
    pick = torch.randperm(len(run.fit_blocks), generator=torch.Generator().manual_seed(seed))
    return run.fit_blocks[pick[:n]]


def choose_lrs(cfg: CompareConfig, run: LMRun, progress: Progress) -> dict[str, Any]:
    """The learning-rate sweep on the dev seed's blocks, per method and layer (validation
    explained variance): method -> {"layers": layer -> sweep summary}."""
    seed = cfg.dev_seed
    fit_acts = capture_blocks(
        run.base, run.sites, fit_sample(run, cfg.lm_training_tokens, 1000 + seed)
    )
    n_val = max(1, math.ceil(cfg.lm_val_tokens / run.val_blocks.shape[1]))
    val_acts = capture_blocks(run.base, run.sites, run.val_blocks[:n_val])
    chosen: dict[str, Any] = {}
    for method in (m for m in cfg.methods if m in TRAINED):
        chosen[method] = {"layers": {}}
        for site in run.sites:
            progress(f"lm: lr sweep of {method} at {site.name} on dev seed {seed}")
            result = sweep(method, fit_acts[site.name], val_acts[site.name],
                           lm_spec(cfg, run, site, seed), cfg.lr_factors)  # fmt: skip
            result.pop("fitted")
            chosen[method]["layers"][site.name] = result
    return chosen


@dataclass
class Scored:
    """What every method is scored on: the held-out tokens, their activations, the concepts."""

    n: int
    acts: dict[str, Tensor]
    """Base LM inputs of each head site ``(n, d)``."""
    tuned_acts: dict[str, Tensor]
    """The same inputs in the fine-tuned codebook model (its codebooks on)."""
    concepts: list[Any]
    positions: dict[str, np.ndarray]
    skipped: list[dict[str, Any]]
    windows: list[tuple[int, int]]
    """The cache windows the CE loss is measured on."""


def scored_data(cfg: CompareConfig, run: LMRun) -> Scored:
    """Activations and concept positions of the held-out cache (the same at every seed)."""
    cache, n = run.cache, run.cache.n_tokens
    acts = {
        s.name: torch.from_numpy(
            module_activations(run.base, cache, s.module, s.hook, max_tokens=n)
        )
        for s in run.sites
    }
    tuned = {
        s.name: torch.from_numpy(site_activations(run.model, cache, s.name, max_tokens=n))
        for s in run.sites
    }
    ccfg = ConceptsConfig(quick=cfg.quick)
    positions: dict[str, np.ndarray] = {}
    skipped: list[dict[str, Any]] = []
    battery = load_battery(None)
    for c in battery:
        p = concept_positions(cache, c, timeout=ccfg.regex_timeout)
        if len(p) < ccfg.min_tokens:
            skipped.append({"name": c.name, "tokens": len(p)})
        else:
            positions[c.name] = p
    concepts = [c for c in battery if c.name in positions]
    windows, total = [], 0
    for w in cache.windows(n):
        if total >= cfg.lm_ce_tokens:
            break
        windows.append(w)
        total += w[1] - w[0]
    return Scored(n, acts, tuned, concepts, positions, skipped, windows)


@torch.no_grad()
def latent_ids(dictionary: Dictionary, x: Tensor, batch: int = 8192) -> np.ndarray:
    """``(N, 1, w)`` the fired latents of each token (``w``: the most any token fires; slots
    with no latent hold ``num_latents``, which the concept counts skip)."""
    dictionary.eval()
    fired = [int((dictionary.encode(x[i : i + batch]) != 0).sum(-1).max()) for i in
             range(0, len(x), batch)]  # fmt: skip
    width = max(1, max(fired, default=1))
    k = None if isinstance(dictionary, CodebookDictionary) else min(width, dictionary.num_latents)
    parts = []
    for i in range(0, len(x), batch):
        idx = dictionary.top_k(x[i : i + batch], k).indices
        parts.append(idx.masked_fill(idx < 0, dictionary.num_latents).numpy().astype(np.int32))
    return np.concatenate(parts)[:, None, :]


@torch.no_grad()
def ce_losses(model: nn.Module, cache: CodeCache, windows: Sequence[tuple[int, int]],
              site: HookSite | None = None, fn: Callable[[Tensor], Tensor] | None = None,
              batch: int = 16) -> float:  # fmt: skip
    """Mean next-token cross-entropy over ``windows`` of the cache's tokens, with ``fn``
    replacing the activation at ``site`` when given."""
    tokens = np.asarray(cache.tokens)
    total, count = 0.0, 0
    with eval_mode(model):
        for b in range(0, len(windows), batch):
            ids, mask = window_inputs(tokens, windows[b : b + batch])
            if site is not None and fn is not None:
                with hook_site(model, site, fn):
                    logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            keep = mask[:, 1:].bool()
            loss = F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")
            total, count = total + float(loss), count + int(keep.sum())
    return total / max(count, 1)


def reconstruct(dictionary: Dictionary) -> Callable[[Tensor], Tensor]:
    """The activation replaced by the dictionary's reconstruction (same shape and dtype)."""

    def fn(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        return dictionary.decode(dictionary.encode(flat)).to(x.dtype).reshape(x.shape)

    return fn


def zero(x: Tensor) -> Tensor:
    """Zero ablation (SAELens's ``evals.py`` ablates with zeros)."""
    return torch.zeros_like(x)


@dataclass
class Reference:
    """CE losses without an edit and with each site zero-ablated, in a model."""

    clean: float
    ablated: dict[str, float]


def reference_losses(model: nn.Module, run: LMRun, data: Scored) -> Reference:
    """``model``'s clean CE loss and its loss with each head site zero-ablated."""
    clean = ce_losses(model, run.cache, data.windows)
    ablated = {s.name: ce_losses(model, run.cache, data.windows, s, zero) for s in run.sites}
    return Reference(clean, ablated)


def ce_score(model: nn.Module, run: LMRun, data: Scored, site: HookSite, dictionary: Dictionary,
             ref: Reference) -> dict[str, float]:  # fmt: skip
    """SAELens's CE-loss score of ``dictionary`` spliced in at ``site``, and the CE increase."""
    spliced = ce_losses(model, run.cache, data.windows, site, reconstruct(dictionary))
    gap = ref.ablated[site.name] - ref.clean
    score = (ref.ablated[site.name] - spliced) / gap if gap > 0 else float("nan")
    return {"ce_loss_score": score, "ce_increase": spliced - ref.clean}


def concept_scores(data: Scored, codes: dict[str, SiteCodes],
                   min_precision: float, min_recall: float) -> dict[str, Any]:  # fmt: skip
    """Best latent per concept over the layers: mean F1, precision, recall; the precise
    concepts; and each concept's F1 (the scatter)."""
    results = score_concepts(data.concepts, data.positions, data.n, codes)
    f1 = {r.name: r.code_f1 for r in results}
    precision = [r.code.precision if r.code is not None else 0.0 for r in results]
    recall = [r.code.recall if r.code is not None else 0.0 for r in results]
    precise = [
        r.name for r in results
        if r.precise is not None and r.precise.recall >= min_recall
        and r.precise.precision >= min_precision
    ]  # fmt: skip
    return {
        "concept_f1_mean": float(np.mean(list(f1.values()))),
        "concept_precision_mean": float(np.mean(precision)),
        "concept_recall_mean": float(np.mean(recall)),
        "precise_concepts": float(len(precise)),
        "concept_f1": f1,
    }


def score_method(method: str, cfg: CompareConfig, run: LMRun, data: Scored,
                 fit_acts: dict[str, Tensor] | None, lr: dict[str, float] | None,
                 refs: dict[str, Reference], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Fit ``method`` at every layer (at its chosen rates) and score it on the held-out tokens.

    Returns its metrics (layer means, ``metric@layer``, per-concept F1) and layer -> curve.
    """
    ccfg = ConceptsConfig(quick=cfg.quick)
    codes: dict[str, SiteCodes] = {}
    per_layer: dict[str, dict[str, float]] = {}
    curves: dict[str, Any] = {}
    for site in run.sites:
        if method == FINETUNED:
            dictionary: Dictionary = CodebookDictionary(run.model.codebooks[site.name])
            x = data.tuned_acts[site.name]
            info = run.cache.info(site.name)
            codes[site.name] = SiteCodes(
                np.asarray(run.cache.codes(site.name)[: data.n]), info.num_codes, info.grouped
            )
            model, ref = run.model.base, refs["finetuned"]
        else:
            assert fit_acts is not None
            fitted = fit(method, fit_acts[site.name], lm_spec(cfg, run, site, seed),
                         None if lr is None else lr[site.name])  # fmt: skip
            dictionary, x = fitted.dictionary, data.acts[site.name]
            codes[site.name] = SiteCodes(latent_ids(dictionary, x), dictionary.num_latents, False)
            model, ref = run.base, refs["base"]
            if fitted.curve:
                curves[site.name] = fitted.curve
        with torch.no_grad():
            fired = torch.cat([dictionary.encode(x[i : i + 8192]) != 0
                               for i in range(0, len(x), 8192)])  # fmt: skip
        m = {
            "explained_variance": explained_variance(dictionary, x),
            "l0": float(fired.sum(-1).float().mean()),
            "dead_fraction": float((~fired.any(0)).float().mean()),
        }
        if method == FINETUNED:
            with run.model.disabled():
                m.update(ce_score(model, run, data, site, dictionary, ref))
        else:
            m.update(ce_score(model, run, data, site, dictionary, ref))
        per_layer[site.name] = m
    out: dict[str, Any] = {
        name: float(np.mean([m[name] for m in per_layer.values()]))
        for name in ("explained_variance", "l0", "dead_fraction", "ce_loss_score", "ce_increase")
    }
    for layer, m in per_layer.items():
        for name, v in m.items():
            out[f"{name}@{layer}"] = v
    out.update(concept_scores(data, codes, ccfg.min_precision, ccfg.min_recall))
    return out, curves


def run_lm(cfg: CompareConfig, progress: Progress) -> dict[str, Any]:
    """Sweep on the dev seed's LM and blocks, then at every scored seed its own LM (trained at
    that seed; the same given ``lm_run`` at every seed), fitting blocks and initialisation,
    every method fitted and scored on that LM's held-out documents.

    Returns ``{"lr", "scores": method -> str(k) -> seed -> metrics, "curves": method -> layer
    -> seed -> curve, "model": the settings and each seed's reference losses}``.
    """
    lrs = choose_lrs(cfg, lm_run(cfg, cfg.dev_seed, progress), progress)
    methods = list(cfg.methods)
    scores: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    curves: dict[str, dict[str, Any]] = {m: {} for m in methods if m in lrs}
    per_seed: dict[str, Any] = {}
    k = ""
    for seed in cfg.seeds:
        run = lm_run(cfg, seed, progress)
        data = scored_data(cfg, run)
        refs = {"base": reference_losses(run.base, run, data)}
        if FINETUNED in methods:
            with run.model.disabled():
                refs["finetuned"] = reference_losses(run.model.base, run, data)
        fit_acts = capture_blocks(run.base, run.sites,
                                  fit_sample(run, cfg.lm_training_tokens, 1000 + seed))  # fmt: skip
        k = str(lm_spec(cfg, run, run.sites[0], seed).k)
        for method in methods:
            progress(f"lm: seed {seed}, {method}")
            lr = ({s.name: lrs[method]["layers"][s.name]["lr"] for s in run.sites}
                  if method in lrs else None)  # fmt: skip
            result, fitted = score_method(method, cfg, run, data, fit_acts, lr, refs, seed)
            scores[method].setdefault(k, {})[str(seed)] = result
            for n, curve in fitted.items():
                curves[method].setdefault(n, {})[str(seed)] = curve
        per_seed[str(seed)] = {
            "folder": str(run.folder),
            "scored_tokens": data.n,
            "ce_tokens": sum(e - s for s, e in data.windows),
            "concepts": len(data.concepts),
            "concepts_skipped": data.skipped,
            "clean_ce": refs["base"].clean,
            "ablated_ce": refs["base"].ablated,
            "finetuned_clean_ce": refs["finetuned"].clean if "finetuned" in refs else None,
        }
    spec = lm_spec(cfg, run, run.sites[0], 0)
    layer = run.model.codebooks[run.sites[0].name]
    return {
        "lr": lrs,
        "scores": scores,
        "curves": curves,
        "k": int(k),
        "model": {
            "given": cfg.lm_run or None,
            "layers": [s.name for s in run.sites],
            "width": int(data.acts[run.sites[0].name].shape[1]),
            "heads": layer.groups,
            "codes_per_head": layer.num_codes,
            "k_per_head": layer.k,
            "num_latents": spec.num_latents,
            "k": spec.k,
            "fit_tokens": int(fit_sample(run, cfg.lm_training_tokens, 0).numel()),
            "seeds": per_seed,
        },
    }
