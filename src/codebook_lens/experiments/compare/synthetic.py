"""The ground-truth workload: SAELens's synthetic benchmark (``sae_lens.synthetic``).

A world is a ``SyntheticModel``: ``num_features`` true feature directions in ``hidden_dim``
dimensions with Zipfian firing probabilities, a hierarchy of mutually exclusive children,
low-rank correlations and varying magnitudes (SynthSAEBench-16k's recipe; at the 'cpu' size
the hierarchy's roots and the correlation rank shrink with the world). Every method is fitted
to the same samples of a world and scored by SAELens's ``eval_sae_on_synthetic_data``.
Learning rates are chosen on the development seed's world; the scored seeds are other worlds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from codebook_lens.codes.saes.dictionary import require
from codebook_lens.experiments.compare.config import CompareConfig
from codebook_lens.experiments.compare.methods import TRAINED, FitSpec, fit, sweep

Progress = Callable[[str], None]


def world_config(cfg: CompareConfig, seed: int) -> Any:
    """SAELens ``SyntheticModelConfig`` of the world at ``seed`` (see the module doc)."""
    syn = require("sae_lens.synthetic", "the synthetic workload")
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, OrthogonalizationConfig

    full = cfg.size == "16k"
    roots = 128 if full else max(2, cfg.num_features // 128)
    rank = 25 if full else max(2, cfg.hidden_dim // 32)
    return syn.SyntheticModelConfig(
        num_features=cfg.num_features,
        hidden_dim=cfg.hidden_dim,
        firing_probability=syn.ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=syn.HierarchyConfig(
            total_root_nodes=roots,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        )
        if cfg.hierarchy
        else None,  # fmt: skip
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4)
        if cfg.orthogonalize == "on" or (cfg.orthogonalize == "auto" and full)
        else None,
        correlation=LowRankCorrelationConfig(rank=rank, correlation_scale=0.1)
        if cfg.correlation
        else None,
        mean_firing_magnitudes=syn.LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=syn.FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=seed,
    )


def make_world(cfg: CompareConfig, seed: int) -> Any:
    """The ``SyntheticModel`` at ``seed`` on ``cfg.device``."""
    syn = require("sae_lens.synthetic", "the synthetic workload")
    return syn.SyntheticModel(world_config(cfg, seed), device=cfg.device)


def sample(world: Any, n: int, seed: int, chunk: int = 65_536) -> torch.Tensor:
    """``n`` activations ``(n, hidden_dim)`` of ``world``, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return torch.cat([world.sample(min(chunk, n - i)) for i in range(0, n, chunk)])


def score(dictionary: Any, world: Any, cfg: CompareConfig, seed: int) -> dict[str, float]:
    """SAELens's ground-truth metrics of ``dictionary`` on fresh samples of ``world``."""
    syn = require("sae_lens.synthetic", "the synthetic workload")
    torch.manual_seed(seed + 10_000)
    r = syn.eval_sae_on_synthetic_data(
        dictionary, world.feature_dict, world.activation_generator,
        num_samples=cfg.eval_samples, batch_size=min(cfg.eval_samples, 8192),
    )  # fmt: skip
    c = r.classification
    return {
        "mcc": float(r.mcc),
        "f1": float(c.f1_score),
        "precision": float(c.precision),
        "recall": float(c.recall),
        "explained_variance": float(r.explained_variance),
        "l0": float(r.sae_l0),
        "true_l0": float(r.true_l0),
        "dead_fraction": float(r.dead_latents) / float(dictionary.W_dec.shape[0]),
        "uniqueness": float(r.uniqueness),
        "shrinkage": float(r.shrinkage),
    }


def spec(cfg: CompareConfig, k: int, seed: int) -> FitSpec:
    return FitSpec(cfg.num_latents, k, cfg.batch_size, seed, cfg.device)


def choose_lrs(cfg: CompareConfig, progress: Progress) -> dict[str, Any]:
    """The learning-rate sweep on the development world: method -> sweep summary."""
    world = make_world(cfg, cfg.dev_seed)
    x = sample(world, cfg.training_samples, cfg.dev_seed)
    val = sample(world, cfg.val_samples, cfg.dev_seed + 5_000)
    chosen: dict[str, Any] = {}
    for method in (m for m in cfg.posthoc_methods() if m in TRAINED):
        progress(f"synthetic: lr sweep of {method} on dev seed {cfg.dev_seed}")
        result = sweep(method, x, val, spec(cfg, cfg.k, cfg.dev_seed), cfg.lr_factors)
        result.pop("fitted")
        chosen[method] = result
    return chosen


def run_synthetic(cfg: CompareConfig, progress: Progress) -> dict[str, Any]:
    """Sweep on the dev seed, then fit and score every method at every seed and L0.

    Returns ``{"lr": method -> sweep summary, "scores": method -> str(k) -> seed -> metrics,
    "curves": method -> seed -> curve (at ``k``), "world": settings}``.
    """
    lrs = choose_lrs(cfg, progress)
    scores: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in cfg.posthoc_methods()}
    curves: dict[str, dict[str, Any]] = {m: {} for m in cfg.posthoc_methods() if m in TRAINED}
    for seed in cfg.seeds:
        world = make_world(cfg, seed)
        x = sample(world, cfg.training_samples, seed)
        for k in cfg.k_values():
            for method in cfg.posthoc_methods():
                progress(f"synthetic: seed {seed}, k={k}, {method}")
                lr = lrs[method]["lr"] if method in lrs else None
                fitted = fit(method, x, spec(cfg, k, seed), lr)
                scores[method].setdefault(str(k), {})[str(seed)] = score(
                    fitted.dictionary, world, cfg, seed
                )
                if k == cfg.k and method in curves:
                    curves[method][str(seed)] = fitted.curve
    world_cfg = world_config(cfg, cfg.dev_seed)
    return {
        "lr": lrs,
        "scores": scores,
        "curves": curves,
        "world": {
            "num_features": cfg.num_features,
            "hidden_dim": cfg.hidden_dim,
            "num_latents": cfg.num_latents,
            "hierarchy_roots": world_cfg.hierarchy.total_root_nodes if cfg.hierarchy else 0,
            "correlation_rank": world_cfg.correlation.rank if cfg.correlation else 0,
        },
    }
