"""The TokFSM workload: the FSM demo's model, every method at the output of each MLP.

The base model is a demo run's (``fsm_run``: a saved ``codebook-lens demo`` folder; else the
demo is run by its own code into ``<out>/tokfsm_demo``). The post-hoc methods are fitted to
the frozen base model's MLP outputs (every position but BOS) on walks the scoring never uses;
``codebook_finetuned`` is the demo's own codebook stage (the MLP codebooks it fine-tuned inside
the model), read at its codebooks' inputs in the fine-tuned model. Scored on held-out walks at
the positions that complete a state, as the demo scores its codes: a latent fires where it is
among the token's active latents; a state has a pure latent when some latent's precision and
recall for it are both >= the demo's purity threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from codebook_lens.codes.saes import CodebookDictionary, Dictionary, capture_activations
from codebook_lens.config import config_from_dict, flat_names_of
from codebook_lens.experiments.compare.config import CompareConfig
from codebook_lens.experiments.compare.methods import (
    TRAINED,
    FitSpec,
    explained_variance,
    fit,
    sweep,
)
from codebook_lens.experiments.compare.steering import Steer, steering_pairs, steering_score
from codebook_lens.experiments.fsm.config import DemoConfig
from codebook_lens.experiments.fsm.data import TokFSM
from codebook_lens.experiments.fsm.metrics import state_code_table, state_positions
from codebook_lens.experiments.fsm.run import finished_run, run_demo
from codebook_lens.model.codebook_model import CodebookModel, HookSite, eval_mode
from codebook_lens.model.sites import resolve_sites

Progress = Callable[[str], None]
FINETUNED = "codebook_finetuned"


@dataclass
class DemoRun:
    """A demo run's machine, settings and models."""

    folder: Path
    fsm: TokFSM
    demo: DemoConfig
    base: nn.Module
    model: CodebookModel | None
    """The fine-tuned codebook model (None: the run has none)."""
    sites: list[HookSite]
    """The base model's MLP outputs, one per layer."""


def demo_config(cfg: CompareConfig) -> DemoConfig:
    """The demo's settings when the command trains it: its defaults, or its quick run."""
    threads = torch.get_num_threads()
    if cfg.quick:
        return DemoConfig.quick(
            seed=cfg.fsm_seed, fsm_seed=cfg.fsm_seed, threads=threads, intervention_pairs=8,
            transition_samples=16, eval_sequences=32,
        )  # fmt: skip
    return DemoConfig(seed=cfg.fsm_seed, fsm_seed=cfg.fsm_seed, threads=threads)


def load_demo_run(folder: str | Path) -> DemoRun:
    """The models of a finished demo run in ``folder`` (base_model/, codebook_model/)."""
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    for name in ("demo_config.json", "fsm.json", "base_model"):
        if not (path / name).exists():
            raise ValueError(f"fsm_run={str(path)!r} is invalid: it has no {name}; give a demo run")
    saved = json.loads((path / "demo_config.json").read_text())
    known = {f.name for f in dataclasses.fields(DemoConfig)} | set(flat_names_of(DemoConfig))
    demo = config_from_dict(DemoConfig, {k: v for k, v in saved.items() if k in known})
    fsm = TokFSM.from_json(json.loads((path / "fsm.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(str(path / "base_model")).eval()
    model = None
    if (path / "codebook_model").is_dir():
        model = CodebookModel.from_pretrained(path / "codebook_model").eval()
    sites = [s for s in resolve_sites(base, demo.codebook_config()) if s.placement == "mlp_out"]
    return DemoRun(path, fsm, demo, base, model, sites)


def demo_run(cfg: CompareConfig, progress: Progress) -> DemoRun:
    """``cfg.fsm_run``, or the demo trained into ``<out>/tokfsm_demo`` (reused when finished)."""
    if cfg.fsm_run:
        return load_demo_run(cfg.fsm_run)
    folder, demo = Path(cfg.out) / "tokfsm_demo", demo_config(cfg)
    if not finished_demo(folder, demo):
        shutil.rmtree(folder, ignore_errors=True)
        progress(f"fsm: training the demo's models into {folder}")
        run_demo(demo, folder, progress=False)
    return load_demo_run(folder)


def finished_demo(folder: Path, demo: DemoConfig) -> bool:
    """Whether ``folder`` holds a finished demo run of the settings ``demo`` (threads aside)."""
    return finished_run(folder, demo) is not None


@torch.no_grad()
def capture(model: nn.Module, sites: list[HookSite], tokens: Tensor, batch: int = 256
            ) -> dict[str, Tensor]:  # fmt: skip
    """Each site's activations on ``tokens`` ``(B, L)``: name -> ``(B, L, d)``."""
    parts: dict[str, list[Tensor]] = {s.name: [] for s in sites}
    with eval_mode(model):
        for i in range(0, len(tokens), batch):
            with contextlib.ExitStack() as stack:
                seen = {s.name: stack.enter_context(capture_activations(model, s)) for s in sites}
                model(input_ids=tokens[i : i + batch])
            for name, acts in seen.items():
                parts[name].append(acts[0])
    return {name: torch.cat(v) for name, v in parts.items()}


def finetuned_sites(model: CodebookModel, names: list[str]) -> list[HookSite]:
    """The inputs of the fine-tuned MLP codebooks (as sites of ``model``), named by codebook."""
    order = list(model.codebooks)
    return [
        HookSite(n, f"codebook_layers.{order.index(n)}", "input", "module", None) for n in names
    ]


def walks(fsm: TokFSM, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random walks ``(n, L)`` and their states, reproducible from ``seed``."""
    return fsm.sample_with_states(n, torch.Generator().manual_seed(seed))


def fit_rows(acts: Tensor) -> Tensor:
    """Training rows ``(B * (L - 1), d)``: every position but BOS."""
    return acts[:, 1:].reshape(-1, acts.shape[-1])


@torch.no_grad()
def score(dictionary: Dictionary, acts: Tensor, ends: Tensor, labels: Tensor, fsm: TokFSM,
          threshold: float) -> dict[str, Any]:  # fmt: skip
    """One dictionary at one site on held-out walks ``acts`` ``(B, L, d)``.

    Returns explained variance, L0 and dead fraction over every position but BOS, and, at the
    state-completing positions ``ends``, the pure states ``(N,)`` bool and best F1 per state.
    """
    dictionary.eval()
    rows = fit_rows(acts)
    fired = dictionary.encode(rows) != 0  # (P, num_latents)
    at_ends = acts[:, ends].reshape(-1, acts.shape[-1])
    z_ends = dictionary.encode(at_ends)  # (P, num_latents)
    width = max(1, int((z_ends != 0).sum(-1).max()))
    k = None if isinstance(dictionary, CodebookDictionary) else min(width, dictionary.num_latents)
    active = dictionary.top_k(at_ends, k).indices.reshape(len(at_ends), -1)
    flat = labels.reshape(-1)
    table = state_code_table("", active, flat, fsm.num_states, dictionary.num_latents)
    latent = torch.from_numpy(table.code).long()
    return {
        "latent": latent,
        "value": typical_values(z_ends, flat, latent),
        "explained_variance": explained_variance(dictionary, rows),
        "l0": float(fired.sum(-1).float().mean()),
        "dead_fraction": float((~fired.any(0)).float().mean()),
        "pure": (table.precision >= threshold) & (table.recall >= threshold),
        "f1": table.f1,
    }


def typical_values(z: Tensor, labels: Tensor, latent: Tensor) -> Tensor:
    """``(N,)`` per state, the mean activation of its best latent ``latent`` where it fires
    on that state's tokens (``z`` ``(P, num_latents)``); where it never does, the latent's
    strongest activation anywhere (1 if none)."""
    own = z[torch.arange(len(z)), latent[labels]]  # (P,) each token's state's latent
    fired = own != 0
    total = torch.zeros(len(latent)).index_add_(0, labels[fired], own[fired].float())
    count = torch.bincount(labels[fired], minlength=len(latent)).float()
    peak = z[:, latent].abs().amax(0).float() if len(z) else torch.ones(len(latent))
    fallback = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.where(count > 0, total / count.clamp_min(1), fallback)


def combine(per_layer: dict[str, dict[str, Any]]) -> dict[str, float]:
    """A method's metrics over layers: pure in any layer (the demo's count), the best F1 over
    layers per state, the rest averaged; plus each layer's own figures (``metric@layer``)."""
    pure = np.any([m["pure"] for m in per_layer.values()], axis=0)
    best_f1 = np.max([m["f1"] for m in per_layer.values()], axis=0)
    out = {"pure_fraction": float(pure.mean()), "mean_best_f1": float(best_f1.mean())}
    for name in ("explained_variance", "l0", "dead_fraction"):
        out[name] = float(np.mean([m[name] for m in per_layer.values()]))
    for layer, m in per_layer.items():
        out[f"pure_fraction@{layer}"] = float(m["pure"].mean())
        out[f"mean_best_f1@{layer}"] = float(m["f1"].mean())
        out[f"explained_variance@{layer}"] = m["explained_variance"]
    return out


def fsm_spec(cfg: CompareConfig, run: DemoRun, seed: int) -> FitSpec:
    """Dictionary size and L0 of the post-hoc methods (default: the demo's codebooks')."""
    num_latents = cfg.fsm_num_latents or run.demo.codebooks.num_codes
    return FitSpec(num_latents, cfg.fsm_k or run.demo.codebooks.k, cfg.batch_size, seed, cfg.device)


def choose_lrs(cfg: CompareConfig, run: DemoRun, progress: Progress) -> dict[str, Any]:
    """The learning-rate sweep on the dev seed's walks, per method and layer (validation
    explained variance): method -> {"layers": layer -> sweep summary}."""
    seed = cfg.dev_seed
    fit_acts = capture(run.base, run.sites, walks(run.fsm, cfg.fsm_sequences, 1000 * seed + 1)[0])
    val_acts = capture(
        run.base, run.sites, walks(run.fsm, cfg.fsm_val_sequences, 1000 * seed + 2)[0]
    )
    chosen: dict[str, Any] = {}
    for method in (m for m in cfg.methods if m in TRAINED):
        chosen[method] = {"layers": {}}
        for layer in fit_acts:
            progress(f"fsm: lr sweep of {method} at {layer} on dev seed {seed}")
            result = sweep(method, fit_rows(fit_acts[layer]), fit_rows(val_acts[layer]),
                           fsm_spec(cfg, run, seed), cfg.lr_factors)  # fmt: skip
            result.pop("fitted")
            chosen[method]["layers"][layer] = result
    return chosen


@dataclass
class SeedData:
    """A scored seed's walks: fitting activations, held-out walks and steering pairs."""

    seed: int
    fit_acts: dict[str, Tensor]
    """Base model activations of the fitting walks: layer -> ``(B, L, d)``."""
    tokens: Tensor
    """``(B, L)`` held-out walks."""
    acts: dict[str, Tensor]
    """Base model activations of ``tokens``."""
    ends: Tensor
    labels: Tensor
    pairs: tuple[Tensor, ...]
    """Steering pairs (``steering_pairs``)."""

    @classmethod
    def make(cls, cfg: CompareConfig, run: DemoRun, seed: int) -> SeedData:
        fit_tokens = walks(run.fsm, cfg.fsm_sequences, 1000 * seed + 1)[0]
        tokens, states = walks(run.fsm, cfg.fsm_eval_sequences, 1000 * seed + 3)
        ends, labels = state_positions(run.fsm, tokens, states)
        pairs = steering_pairs(run.fsm, max(cfg.fsm_steer_pairs, 1),
                               run.demo.intervention_prefix_states, 1000 * seed + 4)  # fmt: skip
        return cls(seed, capture(run.base, run.sites, fit_tokens), tokens,
                   capture(run.base, run.sites, tokens), ends, labels, pairs)  # fmt: skip


def score_method(method: str, cfg: CompareConfig, run: DemoRun, data: SeedData,
                 lr: dict[str, float] | None) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """Fit ``method`` at every layer (at its chosen rates ``lr``) and score it on ``data``.

    Returns its metrics (``combine``'s, plus steering's) and layer -> training curve.
    """
    names = [s.name for s in run.sites]
    threshold = run.demo.purity_threshold
    per_layer: dict[str, dict[str, Any]] = {}
    dictionaries: dict[str, Dictionary] = {}
    curves: dict[str, Any] = {}
    model = run.base
    if method == FINETUNED:
        assert run.model is not None
        model = run.model.base  # its hooks quantize; the steering hooks run after them
        tuned = capture(run.model, finetuned_sites(run.model, names), data.tokens)
        for n in names:
            dictionaries[n] = CodebookDictionary(run.model.codebooks[n])
            per_layer[n] = score(
                dictionaries[n], tuned[n], data.ends, data.labels, run.fsm, threshold
            )
    else:
        for n in names:
            fitted = fit(method, fit_rows(data.fit_acts[n]), fsm_spec(cfg, run, data.seed),
                         None if lr is None else lr[n])  # fmt: skip
            dictionaries[n] = fitted.dictionary
            per_layer[n] = score(
                fitted.dictionary, data.acts[n], data.ends, data.labels, run.fsm, threshold
            )
            if fitted.curve:
                curves[n] = fitted.curve
    out = combine(per_layer)
    if cfg.fsm_steer_pairs:
        steers = [
            Steer(dictionaries[s.name], s, per_layer[s.name]["latent"], per_layer[s.name]["value"])
            for s in run.sites
        ]
        out.update(steering_score(model, run.fsm, steers, data.pairs))
    return out, curves


def run_tokfsm(cfg: CompareConfig, progress: Progress) -> dict[str, Any]:
    """Sweep on the dev seed's walks, then fit and score every method at every scored seed.

    Returns ``{"lr", "scores": method -> str(k) -> seed -> metrics, "curves": method -> layer
    -> seed -> curve, "unsteered": seed -> steering score without an edit, "model": the demo
    run's settings}``.
    """
    run = demo_run(cfg, progress)
    lrs = choose_lrs(cfg, run, progress)
    methods = [m for m in cfg.methods if m != FINETUNED or run.model is not None]
    k = str(fsm_spec(cfg, run, 0).k)
    names = [s.name for s in run.sites]
    scores: dict[str, dict[str, dict[str, Any]]] = {m: {k: {}} for m in methods}
    curves: dict[str, dict[str, Any]] = {m: {n: {} for n in names} for m in methods if m in lrs}
    unsteered: dict[str, dict[str, float]] = {}
    for seed in cfg.seeds:
        data = SeedData.make(cfg, run, seed)
        if cfg.fsm_steer_pairs:
            unsteered[str(seed)] = steering_score(run.base, run.fsm, [], data.pairs)
        for method in methods:
            progress(f"fsm: seed {seed}, {method}")
            lr = {n: lrs[method]["layers"][n]["lr"] for n in names} if method in lrs else None
            result, fitted = score_method(method, cfg, run, data, lr)
            scores[method][k][str(seed)] = result
            for n, curve in fitted.items():
                curves[method][n][str(seed)] = curve
    demo = run.demo
    return {
        "lr": lrs,
        "scores": scores,
        "curves": curves,
        "unsteered": unsteered,
        "k": int(k),
        "model": {
            "folder": str(run.folder),
            "num_states": run.fsm.num_states,
            "layers": names,
            "width": demo.lm.width,
            "num_latents": fsm_spec(cfg, run, 0).num_latents,
            "k": int(k),
            "demo_num_codes": demo.codebooks.num_codes,
            "demo_k": demo.codebooks.k,
            "purity_threshold": demo.purity_threshold,
            "fit_tokens": cfg.fsm_sequences * (run.fsm.seq_len - 1),
        },
    }
