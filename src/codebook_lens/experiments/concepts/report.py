"""The concept experiment's report: report.md, report.html and its plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codebook_lens.experiments.concepts.config import ConceptsConfig
from codebook_lens.experiments.concepts.scoring import ConceptResult


def _unit(x: Any) -> str:
    if x is None:
        return "-"
    if hasattr(x, "neuron"):
        return f"{x.site} n{x.neuron}{'+' if x.sign > 0 else '-'}"
    head = "" if x.head is None else f" h{x.head}"
    return f"{x.codebook}{head} #{x.code}"


def _pr(x: Any) -> str:
    return "-" if x is None else f"{x.precision:.2f} / {x.recall:.2f}"


def _f1(x: Any) -> str:
    return "-" if x is None else f"{x.f1:.3f}"


def write_concepts_report(
    cfg: ConceptsConfig, metrics: dict[str, Any], results: Sequence[ConceptResult], out: Path
) -> Path:
    """report.md + report.html + concepts_scatter.png + concepts_precise.png."""
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    s = metrics["summary"]
    rep = Report("Concept battery: codes against neurons and a k-means control")
    rep.paragraph(
        f"Model: {metrics['model']}; code cache {metrics['cache']}, first {metrics['n_tokens']:,} "
        f"tokens evaluated; battery {metrics['battery']} ({s['concepts']} concepts scored, "
        f"{len(metrics['skipped'])} skipped). Code = the best single code over every codebook by "
        "F1 (precision: the code's firings on concept tokens; recall: concept tokens where it "
        "fires). Neuron = the best single dimension of the same codebook's input (before "
        "quantization) with its best threshold, either sign. Control = k-means "
        f"({cfg.kmeans_iters} Lloyd iterations on {cfg.kmeans_tokens:,} tokens, same number of "
        f"codes, same k and similarity, top-k nearest centroids) of the base model's activations "
        f"at the same site; base: {metrics['base']}. Precise code = the best-recall code with "
        f"precision >= {cfg.min_precision} firing >= {cfg.min_count} times."
    )

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    t = s["targets"]
    rep.table(
        [
            {
                "claim": "best code beats the best neuron at its site (F1)",
                "measured": pct(s["code_beats_neuron"]),
                "target": ">= 80%",
                "met": t["code_beats_neuron"]["met"],
            },
            {
                "claim": f"concepts with {s['precise_definition']}",
                "measured": s["precise_concepts"],
                "target": ">= 10",
                "met": t["precise_concepts"]["met"],
            },
            {
                "claim": "trained code beats the k-means control at its site (F1)",
                "measured": pct(s["code_beats_control"]),
                "target": ">= 70%",
                "met": t["code_beats_control"]["met"],
            },
            {
                "claim": "best code beats the best neuron of any site (stricter, no target)",
                "measured": pct(s["code_beats_neuron_any_site"]),
                "target": "",
                "met": "",
            },
        ],
        caption="Targets",
    )
    rows = []
    for r in results:
        rows.append(
            {
                "concept": r.name,
                "tokens": r.tokens,
                "best code": _unit(r.code),
                "code P / R": _pr(r.code),
                "code F1": _f1(r.code),
                "neuron": _unit(r.neuron),
                "neuron P / R": _pr(r.neuron),
                "neuron F1": _f1(r.neuron),
                "k-means F1": _f1(r.control),
                "precise code P / R": _pr(r.precise),
            }
        )
    rep.table(rows, caption="Every concept (same tokens for code, neuron and control)")

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, label in (
        (axes[0], "neuron", "best neuron F1 (same site)"),
        (axes[1], "control", "k-means control F1 (same site)"),
    ):
        xs = [getattr(r, key).f1 if getattr(r, key) is not None else 0.0 for r in results]
        ys = [r.code_f1 for r in results]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="equal F1")
        ax.scatter(xs, ys, s=22, color="C0" if key == "neuron" else "C2", zorder=3)
        for x, y, r in zip(xs, ys, results, strict=True):
            ax.annotate(r.name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=label, ylabel="best code F1", aspect="equal")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title("code vs neuron")
    axes[1].set_title("trained code vs k-means control")
    rep.figure(
        fig,
        "concepts_scatter",
        caption="One point per concept; above the diagonal the code is the better detector",
    )
    precise = sorted(
        (r for r in results if r.precise is not None),
        key=lambda r: -(r.precise.recall),  # type: ignore[union-attr]
    )
    if precise:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(precise) + 1.2))
        ax.barh([r.name for r in precise], [r.precise.recall for r in precise])  # type: ignore[union-attr]
        ax.axvline(cfg.min_recall, color="C3", ls="--", lw=1, label=f"recall {cfg.min_recall}")
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel=f"recall of the best code with precision >= {cfg.min_precision}")
        ax.legend(fontsize=8)
        rep.figure(
            fig,
            "concepts_precise",
            caption=f"Concepts with a code of precision >= {cfg.min_precision} "
            f"({len(precise)} of {len(results)}), by that code's recall",
        )
    else:
        rep.paragraph(f"No concept has a code with precision >= {cfg.min_precision}.")
    if metrics["skipped"]:
        rep.paragraph(
            "Skipped: " + "; ".join(f"{x['name']} ({x['reason']})" for x in metrics["skipped"])
        )
    rep.heading("Top contexts of each concept's best code")
    for r in results:
        rep.heading(f"{r.name}: {_unit(r.code)} (F1 {_f1(r.code)})", level=3)
        rep.paragraph(
            f"Pattern ({r.kind}): {r.query}" + (f" — {r.description}" if r.description else "")
        )
        rep.code("\n".join(r.contexts) if r.contexts else "(the code never fires)")
    rep.paragraph(f"Run time: {metrics['seconds']:.0f} s. Full results in metrics.json.")
    return rep.write(out)
