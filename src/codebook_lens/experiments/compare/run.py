"""``run_compare``: every workload, every method, the seeds; metrics.json, config.json, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from codebook_lens.config import write_json_atomic
from codebook_lens.experiments.compare.config import CompareConfig
from codebook_lens.experiments.compare.lm import run_lm
from codebook_lens.experiments.compare.report import write_compare_report
from codebook_lens.experiments.compare.synthetic import run_synthetic
from codebook_lens.experiments.compare.tokfsm import run_tokfsm

PUBLISHED = {
    "synthetic": {
        "found": False,
        "where": "SAELens docs/synth_sae_bench.md, section 'Benchmark Results'",
        "note": "SAELens's documentation shows its SynthSAEBench-16k results only as a "
        "figure (assets/vary-l0_combined_2x3.png) and points to the SAEs and metrics on the "
        "hub (decoderesearch/synth-sae-bench-16k-v1-saes); it prints no table of figures, "
        "so none is put beside ours. Its recommended settings are used: width 4,096 at the "
        "16k size, Adam at 3e-4, batches of 1,024.",
    }
}
"""What SAELens publishes for the synthetic benchmark (searched in its docs and code)."""


SUMMARY = {
    "synthetic": ("mcc", "f1", "explained_variance"),
    "fsm": ("pure_fraction", "mean_best_f1", "explained_variance"),
    "lm": ("concept_f1_mean", "explained_variance", "ce_loss_score"),
}
"""The metrics ``format_summary`` prints per workload."""


def summarize(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` (std over seeds, ddof 0)."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "values": [float(v) for v in a]}


def aggregate(scores: dict[str, dict[str, dict[str, dict[str, float]]]], k: int) -> dict[str, Any]:
    """method -> metric -> summary over seeds at L0 ``k`` (``scores`` as ``run_synthetic``)."""
    out: dict[str, Any] = {}
    for method, by_k in scores.items():
        per_seed = list(by_k[str(k)].values())
        out[method] = {
            m: summarize([s[m] for s in per_seed])
            for m, v in per_seed[0].items()
            if isinstance(v, int | float)
        }
    return out


def record(metrics: dict[str, Any], workload: str, result: dict[str, Any]) -> dict[str, Any]:
    """A model workload's table at its L0, learning rates, curves and ``<workload>_model``
    into ``metrics``; returns ``result``."""
    metrics["compare"][workload] = aggregate(result["scores"], result["k"])
    metrics["lr"][workload] = result["lr"]
    metrics["curves"][workload] = result["curves"]
    metrics[f"{workload}_model"] = result["model"]
    return result


def run_compare(
    cfg: CompareConfig, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run ``cfg.workloads``; write metrics.json, config.json and the report into ``cfg.out``.

    ``metrics["compare"][workload][method][metric]`` holds ``mean``, ``std`` and the per-seed
    ``values`` at L0 = ``cfg.k``; ``metrics["l0"]`` the same at each L0 of ``k_values()``.
    """
    say = progress or (lambda _msg: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics: dict[str, Any] = {
        "compare": {},
        "l0": {},
        "lr": {},
        "curves": {},
        "published": PUBLISHED,
        "seeds": {"dev": cfg.dev_seed, "scored": list(cfg.seeds)},
    }
    if "synthetic" in cfg.workloads:
        syn = run_synthetic(cfg, say)
        metrics["compare"]["synthetic"] = aggregate(syn["scores"], cfg.k)
        metrics["l0"]["synthetic"] = {str(k): aggregate(syn["scores"], k) for k in cfg.k_values()}
        metrics["lr"]["synthetic"] = syn["lr"]
        metrics["curves"]["synthetic"] = syn["curves"]
        metrics["world"] = syn["world"]
    if "fsm" in cfg.workloads:
        fsm = record(metrics, "fsm", run_tokfsm(cfg, say))
        if fsm["unsteered"]:
            per_seed = list(fsm["unsteered"].values())
            metrics["fsm_unsteered"] = {n: summarize([v[n] for v in per_seed]) for n in per_seed[0]}
    if "lm" in cfg.workloads:
        lm = record(metrics, "lm", run_lm(cfg, say))
        metrics["lm_concept_f1"] = {
            m: {seed: s["concept_f1"] for seed, s in by_k[str(lm["k"])].items()}
            for m, by_k in lm["scores"].items()
        }
    metrics["seconds"] = time.perf_counter() - start
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "config.json", asdict(cfg))
    write_compare_report(cfg, metrics, out)
    return metrics


def format_summary(metrics: dict[str, Any]) -> str:
    """One line per workload and method: the headline metrics, mean +- std over seeds."""
    lines = []
    for workload, methods in metrics["compare"].items():
        names = SUMMARY[workload]
        head = "".join(f"{n[:13]:>14}" for n in names)
        lines.append(f"{workload}: {'method':<20}{head}")
        for method, m in methods.items():
            cells = "".join(f"{m[k]['mean']:>8.3f}±{m[k]['std']:<5.3f}" for k in names)
            lines.append(f"{'':<11}{method:<20}{cells}")
    lines.append(f"{metrics['seconds']:.0f} s")
    return "\n".join(lines)
