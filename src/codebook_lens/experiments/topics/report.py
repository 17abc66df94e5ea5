"""The topic experiment's report: report.md, report.html and its charts."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from codebook_lens.codes.intervene import Generation
from codebook_lens.experiments.topics.classifier import TopicClassifier
from codebook_lens.experiments.topics.config import TopicsConfig


def write_topics_report(
    cfg: TopicsConfig,
    metrics: dict[str, Any],
    clf: TopicClassifier,
    gens: dict[str | None, list[tuple[int, Generation]]],
    out: Path,
) -> Path:
    """report.md + report.html + topics_chart.png (via ``report.Report``)."""
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    topics = list(metrics["topics"])
    clf_m = metrics["classifier"]
    rep = Report("Topic steering with codebook features")
    if cfg.selection in ("effect", "both"):
        ranking = (
            ("ranked by where they fire AND, separately, " if cfg.selection == "both" else "")
            + "re-ranked by what each does when forced alone (slot "
            f"'{cfg.slot}', scale {cfg.scale}) on {cfg.effect_contexts} unsteered samples of "
            f"{cfg.effect_length} tokens from each tuning prompt: the rise of the next token's "
            "expected log-likelihood ratio of the topic against the other topics (token counts "
            "of the cache's documents); codes that do not raise it are dropped"
            + ("; the sweep keeps the better ranking per topic" if cfg.selection == "both" else "")
        )
    else:
        ranking = "ranked by precision x the fraction of the topic's documents they fire in"
    if metrics.get("tuning"):
        how_many = (
            "the number of forced codes and their scale are chosen per topic on the tuning "
            "prompts (best gain with perplexity <= "
            f"{cfg.tune_perplexity_ratio}x the unsteered there, a margin under the target's "
            f"{cfg.max_perplexity_ratio}x; see the trade-off below)"
        )
    else:
        how_many = f"the best {cfg.codes_per_topic} are forced at scale {cfg.scale}"
    rep.paragraph(
        f"Model: {metrics['model']} (codebooks on every attention head), trained on "
        f"{metrics['lm_docs']} {cfg.data} documents. Topic codes were searched in a code cache of "
        f"{metrics['cache_tokens']:,} tokens of those documents: codes whose firings land in the "
        f"topic's documents at least {cfg.min_precision:.0%} of the time, {ranking}; {how_many} "
        f"(at most {cfg.max_codes_per_head} per head, slot '{cfg.slot}', every position) while "
        f"sampling {cfg.max_new_tokens} tokens from each of {len(cfg.prompts)} neutral "
        f"evaluation prompts x {cfg.samples_per_prompt} samples (temperature {cfg.temperature}, "
        f"top-k {cfg.top_k}); the unsteered samples use the same prompts and seeds."
    )
    rep.paragraph(
        "Evaluation prompts (never used to choose anything): "
        + ", ".join(repr(p) for p in metrics.get("evaluation_prompts", cfg.prompts))
        + ". Tuning prompts (code effects and the tuning sweep only): "
        + ", ".join(repr(p) for p in metrics.get("tuning_prompts", cfg.tune_prompts))
        + "."
    )
    rep.paragraph(
        f"Judge: {clf_m['kind']}, trained on {clf_m['train_docs']} held-out articles the LM never "
        f"saw; accuracy on {clf_m['test_docs']} other held-out articles: "
        f"{clf_m['heldout_accuracy']:.1%} (whole articles), {clf_m['snippet_accuracy']:.1%} "
        f"(first {clf_m['snippet_words']} words, about the length of a generation). A generation "
        "is on-topic when the judge's most likely topic is the steered topic."
    )
    rows = []
    for t in topics:
        m = metrics["topics"][t]
        r = m.get("perplexity_ratio")
        rows.append(
            {
                "topic": t,
                "ranking": m.get("setting", {}).get("ranking", cfg.selection),
                "codes": len(m["codes"]),
                "scale": m.get("setting", {}).get("scale", cfg.scale),
                "unsteered on-topic": f"{m['baseline_rate']:.0%}",
                "steered on-topic": f"{m['steered_rate']:.0%}",
                "gain (points)": f"{100 * m['gain']:+.0f}",
                "samples": m["samples"],
                "perplexity (steered)": m["steered_perplexity"],
                "x unsteered": "n/a" if r is None else f"{r:.2f}",
            }
        )
    target = metrics["target"]
    rep.table(rows, caption="On-topic rate without and with steering")
    base_ppl = metrics["baseline"]["perplexity"]
    rep.paragraph(
        f"Fluency: perplexity of the generations under the base model without codebooks is "
        f"{format_ppl(base_ppl)} for the unsteered samples ({metrics['baseline']['samples']} "
        "samples); the last column gives it for each steered set. "
        f"Target (>= 30 points gain for >= 3 of 5 topics): {target['topics_with_gain_ge_30pts']} "
        f"topics reach it -> {'met' if target['met'] else 'NOT met'}."
    )
    every = metrics.get("target_every_topic")
    if every:
        rep.paragraph(
            f"Target (every topic >= +30 points and perplexity <= {every['max_perplexity_ratio']}x "
            f"the unsteered): {every['topics_with_gain_ge_30pts']}/{every['topics']} topics gain "
            f">= 30 points, {every['topics_within_perplexity_ratio']}/{every['topics']} stay "
            f"within the perplexity bound -> {'met' if every['met'] else 'NOT met'}."
        )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(topics))
    ax.bar(x - 0.2, [metrics["topics"][t]["baseline_rate"] for t in topics], 0.4, label="unsteered")
    ax.bar(x + 0.2, [metrics["topics"][t]["steered_rate"] for t in topics], 0.4, label="steered")
    ax.set_xticks(x, topics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("on-topic rate")
    ax.legend()
    rep.figure(fig, "topics_chart", caption="Fraction of generations judged on-topic")
    tuning = metrics.get("tuning")
    if tuning:
        rep.heading("Trade-off: gain against perplexity (tuning prompts)")
        fig, ax = plt.subplots(figsize=(7, 4.2))
        tune_rows = []
        styles = ["-", "--", ":", "-."]
        for ti, t in enumerate(topics):
            pts = tuning["topics"][t]["points"]
            if not pts:
                continue
            names = sorted({str(p.get("ranking", cfg.selection)) for p in pts})
            for si, sc in enumerate(sorted({p["scale"] for p in pts})):
                for ri, r in enumerate(names):
                    line = sorted(
                        (
                            p
                            for p in pts
                            if p["scale"] == sc and p.get("ranking", cfg.selection) == r
                        ),
                        key=lambda p: p["codes"],
                    )
                    ax.plot(
                        [p["perplexity_ratio"] for p in line],
                        [100 * p["gain"] for p in line],
                        marker="os^"[ri % 3],
                        markersize=3,
                        color=f"C{ti % 10}",
                        ls=styles[si % len(styles)],
                        label=f"{t}, scale {sc:g}" + (f", {r}" if len(names) > 1 else ""),
                    )
            chosen = tuning["topics"][t]["chosen"]
            if chosen is not None:
                ax.plot(
                    [chosen["perplexity_ratio"]],
                    [100 * chosen["gain"]],
                    marker="*",
                    markersize=12,
                    color=f"C{ti % 10}",
                )
            for p in pts:
                tune_rows.append(
                    {
                        "topic": t,
                        "ranking": p.get("ranking", cfg.selection),
                        "codes": p["codes"],
                        "scale": p["scale"],
                        "gain (points)": f"{100 * p['gain']:+.0f}",
                        "perplexity": p["perplexity"],
                        "x unsteered": f"{p['perplexity_ratio']:.2f}",
                        "chosen": "yes" if p == tuning["topics"][t]["chosen"] else "",
                    }
                )
        ax.axhline(30, color="grey", ls="--", lw=0.8)
        ax.axvline(cfg.tune_perplexity_ratio, color="grey", ls=":", lw=0.8)
        ax.axvline(cfg.max_perplexity_ratio, color="grey", ls="-.", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity / unsteered perplexity (log scale)")
        ax.set_ylabel("gain in on-topic rate (points)")
        ax.legend(fontsize=6, ncol=2)
        rep.figure(
            fig,
            "topics_tradeoff",
            caption="Each line: one topic (colour) and scale (line style), points = more forced "
            f"codes; star = the setting chosen (tuning prompts, {tuning['samples_per_prompt']} "
            f"samples per prompt); dotted: the tuning bound {cfg.tune_perplexity_ratio}x, "
            f"dash-dotted: the target's {cfg.max_perplexity_ratio}x",
        )
        rep.table(
            tune_rows,
            caption=f"Tuning sweep (unsteered perplexity {format_ppl(tuning['baseline_perplexity'])})",
        )
    rep.heading("Topic codes")
    code_rows = []
    for t in topics:
        for c in metrics["topics"][t]["codes"][:5]:
            head = "" if c["head"] is None else f" head {c['head']}"
            code_rows.append(
                {
                    "topic": t,
                    "code": f"{c['codebook']}{head} #{c['code']}",
                    "precision": c["precision"],
                    "doc coverage": c["coverage"],
                    "fires on tokens": c["count"],
                }
            )
    rep.table(code_rows, caption="Best 5 codes per topic")
    rep.heading("Samples")
    for cond in [None, *topics]:
        shown = [g.text or "" for _, g in gens[cond][:3]]
        label = "unsteered" if cond is None else f"steered to {cond}"
        judged = clf.predict(shown)
        lines = [
            f"[{j or '-'}] {cfg.prompts[pi]}{g.text or ''}".replace("\n", " ")
            for (pi, g), j in zip(gens[cond][:3], judged, strict=True)
        ]
        rep.heading(label, level=3)
        rep.code("\n".join(textwrap_lines(lines)))
    rep.paragraph(
        "Judge's top words per topic: "
        + "; ".join(f"{t}: {', '.join(clf.top_words(t, 6))}" for t in topics)
        + "."
    )
    rep.paragraph(
        "Replay a topic's steering from the shell: codebook-lens generate "
        f'{metrics["model"].removesuffix(" (reused)")} "The" --intervene '
        f"{out / 'specs' / (topics[0] + '.yaml')} --n 5 (one spec per topic in specs/)."
    )
    rep.paragraph(f"Run time: {metrics['seconds']:.0f} s. Full settings in metrics.json.")
    return rep.write(out)


def format_ppl(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def textwrap_lines(lines: list[str], width: int = 110) -> list[str]:
    out: list[str] = []
    for line in lines:
        out += textwrap.wrap(line, width, subsequent_indent="    ") or [""]
    return out
