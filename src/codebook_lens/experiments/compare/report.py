"""The comparison's report: report.md, report.html, the metric-vs-L0 and training-curve plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codebook_lens.experiments.compare.config import CompareConfig

HEADLINE = ("mcc", "f1", "precision", "recall", "explained_variance", "l0", "dead_fraction")
FSM_HEADLINE = ("pure_fraction", "mean_best_f1", "explained_variance", "l0", "dead_fraction")
LM_HEADLINE = ("concept_f1_mean", "concept_precision_mean", "concept_recall_mean",
               "precise_concepts", "explained_variance", "ce_loss_score", "ce_increase", "l0",
               "dead_fraction")  # fmt: skip


def _pm(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def write_compare_report(cfg: CompareConfig, metrics: dict[str, Any], out: Path) -> Path:
    """report.md + report.html + the plots (synthetic_l0.png, synthetic_curves.png,
    fsm_curves.png: those of the workloads run) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    rep = Report("Codebooks against sparse autoencoders")
    seeds = metrics["seeds"]
    rep.paragraph(
        "Every method of a workload is fitted to the same activations at the same dictionary "
        f"size and L0, in batches of {cfg.batch_size}. Learning rates are chosen on development "
        f"seed {seeds['dev']}; the tables are mean ± std over the scored seeds {seeds['scored']}."
    )
    if "synthetic" in metrics["compare"]:
        w = metrics["world"]
        rep.heading("Ground truth: SAELens's synthetic benchmark")
        rep.paragraph(
            f"Budget {cfg.training_samples:,} samples, {cfg.num_latents} latents, L0 = {cfg.k}. "
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
        rep.figure(_curve_figure(plt, metrics["curves"]["synthetic"], metrics["lr"]["synthetic"]),
                   "synthetic_curves",
                   caption="Training curves: scored seeds at the chosen rate (solid), the "
                   "development sweep (dotted); each library's own loss")  # fmt: skip
        pub = metrics["published"]["synthetic"]
        rep.heading("SAELens's published SynthSAEBench figures", 3)
        rep.paragraph(f"Searched in {pub['where']}. {pub['note']}")
    if "fsm" in metrics["compare"]:
        _tokfsm_section(rep, plt, cfg, metrics)
    if "lm" in metrics["compare"]:
        _lm_section(rep, plt, cfg, metrics)
    return rep.write(out)


def _lm_section(rep: Any, plt: Any, cfg: CompareConfig, metrics: dict[str, Any]) -> None:
    m, seeds = metrics["lm_model"], metrics["seeds"]
    first = next(iter(m["seeds"].values()))
    rep.heading("The BBC language model at its attention outputs")
    source = (
        f"the topic run in {m['given']} at every seed" if m["given"] else
        "the topic experiment's models trained at each seed (base LM and codebook fine-tuning)"
    )  # fmt: skip
    rep.paragraph(
        f"Models: {source}. Sites: the attention output of each layer before its projection "
        f"({', '.join(m['layers'])}; width {m['width']}, {m['heads']} heads); the fine-tuned "
        f"model has one codebook per head ({m['codes_per_head']} codes, k = {m['k_per_head']}), "
        f"so every post-hoc method gets {m['num_latents']} latents and L0 = {m['k']} per layer "
        f"(the post-hoc codebook and k-means keep one codebook per head). Fitted to the frozen "
        f"base LM on {m['fit_tokens']:,} tokens of its training documents (new blocks at each "
        f"seed), learning rates chosen per layer on dev seed {seeds['dev']} (validation "
        f"explained variance on other training blocks); scored at seeds {seeds['scored']} on "
        f"{first['scored_tokens']:,} tokens of held-out articles (never seen by the LM or a "
        f"method): the concept battery ({first['concepts']} concepts occur; best latent per "
        "concept by F1 over layers), explained variance, L0 and dead fraction; CE-loss score as "
        "SAELens's evals.py defines it (zero ablation; one layer spliced at a time) on "
        f"{first['ce_tokens']:,} of those tokens. codebook_finetuned is read at its inputs in "
        "the fine-tuned model and spliced into that model with its codebooks off."
    )
    table = metrics["compare"]["lm"]
    rep.table([{"method": k, **{h: _pm(v[h]) for h in LM_HEADLINE if h in v}}
               for k, v in table.items()])  # fmt: skip
    rep.heading("Per layer", 3)
    rows = []
    for method, v in table.items():
        for layer in m["layers"]:
            rows.append({"method": method, "layer": layer, **{
                h: _pm(v[f"{h}@{layer}"]) for h in ("explained_variance", "ce_loss_score", "l0")
                if f"{h}@{layer}" in v
            }})  # fmt: skip
    rep.table(rows)
    rep.heading("Learning rates (chosen on the development seed)", 3)
    rep.table([
        {"method": method, "layer": layer, "recommended": f"{s['recommended_lr']:.2g}",
         "chosen": f"{s['lr']:.2g}", "tried (lr: val. expl. var.)": ", ".join(
             f"{t['lr']:.2g}: {t['val_explained_variance']:.3f}" for t in s["tried"])}
        for method, by_layer in metrics["lr"]["lm"].items()
        for layer, s in by_layer["layers"].items()
    ])  # fmt: skip
    if "codebook_finetuned" in metrics["lm_concept_f1"]:
        rep.figure(_scatter_figure(plt, metrics["lm_concept_f1"]), "lm_concept_scatter",
                   caption="Per concept: best-code F1 of the fine-tuned codebooks against each "
                   "method's best-latent F1 (mean over the scored seeds)")  # fmt: skip


def _scatter_figure(plt: Any, per_method: dict[str, dict[str, dict[str, float]]]) -> Any:
    def mean_f1(by_seed: dict[str, dict[str, float]]) -> dict[str, float]:
        # each seed's LM has its own held-out split, so a rare concept may occur in some only
        seen: dict[str, list[float]] = {}
        for f1 in by_seed.values():
            for n, v in f1.items():
                seen.setdefault(n, []).append(v)
        return {n: sum(v) / len(v) for n, v in seen.items()}

    ours = mean_f1(per_method["codebook_finetuned"])
    others = [m for m in per_method if m != "codebook_finetuned"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for method in others:
        theirs = mean_f1(per_method[method])
        names = sorted(set(ours) & set(theirs))
        ax.scatter([theirs[n] for n in names], [ours[n] for n in names], s=12, label=method)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("method's best latent F1")
    ax.set_ylabel("fine-tuned codebook's best code F1")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _tokfsm_section(rep: Any, plt: Any, cfg: CompareConfig, metrics: dict[str, Any]) -> None:
    m, seeds = metrics["fsm_model"], metrics["seeds"]
    rep.heading("TokFSM: the FSM demo's model at its MLP outputs")
    rep.paragraph(
        f"The demo run in {m['folder']} ({m['num_states']} states, residual width "
        f"{m['width']}; its codebooks: {m['demo_num_codes']} codes, k = {m['demo_k']}). The "
        f"post-hoc methods have {m['num_latents']} latents and L0 = {m['k']}, fitted to the "
        f"frozen base model's outputs of {', '.join(m['layers'])} on {m['fit_tokens']:,} "
        f"tokens of new walks at each seed; learning rates chosen per layer on dev seed "
        f"{seeds['dev']}'s walks (validation explained variance); scored on "
        f"{cfg.fsm_eval_sequences} held-out walks at each of seeds {seeds['scored']}. "
        "codebook_finetuned is the demo's own fine-tuned MLP codebooks, read at their inputs "
        "in the fine-tuned model (its seeds vary the scored walks only). A state has a pure "
        f"latent when a latent's precision and recall for it are >= {m['purity_threshold']} "
        "in some layer (the demo's definition); best F1 is the best over latents and layers, "
        "averaged over states; explained variance, L0 and dead fraction are means over layers."
    )
    table = metrics["compare"]["fsm"]
    rep.table([{"method": k, **{h: _pm(v[h]) for h in FSM_HEADLINE}} for k, v in table.items()])
    if "fsm_unsteered" in metrics:
        rep.heading("Steering", 3)
        rep.paragraph(
            f"{cfg.fsm_steer_pairs} walks per seed ending in a state a, steered at the last token "
            "of a (every MLP output at once) toward another state b: a sparse autoencoder or a "
            "neuron gets b's best latent added at its typical value (value x decoder row), a "
            "codebook is forced to b's best code; the reconstruction error is kept. Success: "
            ">= 80% of the model's top-E next states are successors of b (the demo's patching "
            "criterion). Unsteered, the same walks succeed at "
            f"{_pm(metrics['fsm_unsteered']['steer_success'])}."
        )
        names = ("steer_success", "steer_top_e_on_target", "steer_mass_on_target")
        rep.table([{"method": k, **{h: _pm(v[h]) for h in names}} for k, v in table.items()])
    rep.heading("Per layer", 3)
    rows = []
    for method, v in table.items():
        for layer in m["layers"]:
            rows.append({"method": method, "layer": layer, **{
                h: _pm(v[f"{h}@{layer}"])
                for h in ("pure_fraction", "mean_best_f1", "explained_variance")
            }})  # fmt: skip
    rep.table(rows)
    lrs = metrics["lr"]["fsm"]
    rep.heading("Learning rates (chosen on the development seed)", 3)
    rep.table([
        {"method": method, "layer": layer, "recommended": f"{s['recommended_lr']:.2g}",
         "chosen": f"{s['lr']:.2g}", "tried (lr: val. expl. var.)": ", ".join(
             f"{t['lr']:.2g}: {t['val_explained_variance']:.3f}" for t in s["tried"])}
        for method, by_layer in lrs.items() for layer, s in by_layer["layers"].items()
    ])  # fmt: skip
    curves = {
        method: {f"{layer} seed {seed}": c for layer, by_seed in by_layer.items()
                 for seed, c in by_seed.items()}
        for method, by_layer in metrics["curves"]["fsm"].items()
    }  # fmt: skip
    tried = {
        method: {"tried": [t for s in by_layer["layers"].values() for t in s["tried"]]}
        for method, by_layer in lrs.items()
    }
    rep.figure(_curve_figure(plt, curves, tried), "fsm_curves",
               caption="TokFSM training curves: scored seeds at the chosen rate (solid), the "
               "development sweep (dotted); each library's own loss")  # fmt: skip


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


def _curve_figure(plt: Any, curves: dict[str, dict[str, Any]], lrs: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.2))
    axes = axes if len(curves) > 1 else [axes]
    for ax, (method, by_seed) in zip(axes, curves.items(), strict=False):
        for seed, curve in by_seed.items():
            if curve:
                label = seed if " " in seed else f"seed {seed}"
                ax.plot(*zip(*curve, strict=True), label=label)
        for tried in lrs.get(method, {}).get("tried", []):
            if tried["curve"]:
                ax.plot(*zip(*tried["curve"], strict=True), ":", label=f"dev lr {tried['lr']:.2g}")
        ax.set_yscale("log")
        ax.set_xlabel("training samples")
        ax.set_title(method)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
