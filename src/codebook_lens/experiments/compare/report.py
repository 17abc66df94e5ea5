"""The comparison's report: report.md, report.html, the metric-vs-L0 and training-curve plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codebook_lens.experiments.compare.config import CompareConfig

HEADLINE = ("mcc", "f1", "precision", "recall", "explained_variance", "l0", "dead_fraction")


def _pm(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def write_compare_report(cfg: CompareConfig, metrics: dict[str, Any], out: Path) -> Path:
    """report.md + report.html + the plots synthetic_l0.png and synthetic_curves.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    rep = Report("Codebooks against sparse autoencoders")
    seeds = metrics["seeds"]
    rep.paragraph(
        f"Every method is fitted to the same activations (budget {cfg.training_samples:,} "
        f"samples, batches of {cfg.batch_size}) at {cfg.num_latents} latents and L0 = "
        f"{cfg.k}. Learning rates are chosen on development seed {seeds['dev']}; the "
        f"tables are mean ± std over the scored seeds {seeds['scored']}."
    )
    if "synthetic" in metrics["compare"]:
        w = metrics["world"]
        rep.heading("Ground truth: SAELens's synthetic benchmark")
        rep.paragraph(
            f"{w['num_features']:,} true features in {w['hidden_dim']} dimensions (hierarchy "
            f"roots {w['hierarchy_roots']}, correlation rank {w['correlation_rank']}); scored "
            f"by sae_lens.synthetic.eval_sae_on_synthetic_data on {cfg.eval_samples:,} fresh "
            "samples per method."
        )
        table = metrics["compare"]["synthetic"]
        rep.table(
            [{"method": method, **{h: _pm(m[h]) for h in HEADLINE}} for method, m in table.items()]
        )
        rep.heading("Learning rates (chosen on the development seed)", 3)
        rows = []
        for method, s in metrics["lr"]["synthetic"].items():
            tried = ", ".join(
                f"{t['lr']:.2g}: {t['val_explained_variance']:.3f}" for t in s["tried"]
            )
            rows.append(
                {
                    "method": method,
                    "recommended": f"{s['recommended_lr']:.2g}",
                    "chosen": f"{s['lr']:.2g}",
                    "tried (lr: val. expl. var.)": tried,
                }
            )
        rep.table(rows)
        rep.figure(_l0_figure(plt, metrics["l0"]["synthetic"]), "synthetic_l0",
                   caption="Metric against L0 per method (mean ± std over the scored seeds)")  # fmt: skip
        rep.figure(_curve_figure(plt, metrics), "synthetic_curves",
                   caption="Training curves: scored seeds at the chosen rate (solid), the "
                   "development sweep (dotted); each library's own loss")  # fmt: skip
        pub = metrics["published"]["synthetic"]
        rep.heading("SAELens's published SynthSAEBench figures", 3)
        rep.paragraph(f"Searched in {pub['where']}. {pub['note']}")
    return rep.write(out)


def _l0_figure(plt: Any, by_k: dict[str, dict[str, Any]]) -> Any:
    names = ("mcc", "f1", "explained_variance")
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4))
    ks = sorted(by_k, key=int)
    for ax, name in zip(axes, names, strict=True):
        for method in by_k[ks[0]]:
            xs = [by_k[k][method]["l0"]["mean"] for k in ks]
            ys = [by_k[k][method][name]["mean"] for k in ks]
            es = [by_k[k][method][name]["std"] for k in ks]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_title(name)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _curve_figure(plt: Any, metrics: dict[str, Any]) -> Any:
    curves = metrics["curves"]["synthetic"]
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.2))
    axes = axes if len(curves) > 1 else [axes]
    for ax, (method, by_seed) in zip(axes, curves.items(), strict=False):
        for seed, curve in by_seed.items():
            if curve:
                ax.plot(*zip(*curve, strict=True), label=f"seed {seed}")
        for tried in metrics["lr"]["synthetic"].get(method, {}).get("tried", []):
            if tried["curve"]:
                ax.plot(*zip(*tried["curve"], strict=True), ":", label=f"dev lr {tried['lr']:.2g}")
        ax.set_yscale("log")
        ax.set_xlabel("training samples")
        ax.set_title(method)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
