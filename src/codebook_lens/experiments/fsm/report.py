"""The FSM demo's reports: one run (report.html/.md) and several seeds (summary.*)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from codebook_lens.experiments.fsm.config import PATCH_GROUPS, DemoConfig
from codebook_lens.experiments.fsm.metrics import REFERENCE, TARGETS, StateCodeTable, check_targets


# ------------------------------------------------------------------- report
def _plot_curves(rep: Any, base_hist: list[dict[str, Any]], cb_hist: list[dict[str, Any]], floor: float,
                 cfg: DemoConfig) -> None:  # fmt: skip
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for hist, label in ((base_hist, "base (from scratch)"), (cb_hist, "codebook (fine-tune)")):
        pts = [(r["step"], r["lm_loss"]) for r in hist if "lm_loss" in r]
        if pts:
            offset = max((r["step"] for r in base_hist), default=0) if hist is cb_hist else 0
            ax.plot([s + offset for s, _ in pts], [v for _, v in pts], label=label)
    ax.axhline(floor, color="gray", ls="--", lw=1, label=f"task floor {floor:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.legend()
    rep.figure(
        fig, "training_curves", caption="Training loss; the codebook model starts from the base"
    )


def _plot_states(rep: Any, tables: list[StateCodeTable], neurons: list[dict[str, np.ndarray]],
                 cfg: DemoConfig) -> None:  # fmt: skip
    import matplotlib.pyplot as plt

    best = max(tables, key=lambda t: t.fraction_pure(cfg.purity_threshold))
    order = np.argsort(best.code, kind="stable")
    used = np.unique(best.code)
    heat = best.counts[np.ix_(order, used)]
    heat = heat / np.maximum(heat.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(heat, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel(f"codes of {best.codebook} (the best code of some state)")
    ax.set_ylabel("state (sorted by its best code)")
    fig.colorbar(im, ax=ax, label="P(code | state)")
    rep.figure(fig, "state_code_heatmap", caption=f"Code <-> state table for {best.codebook}")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    code_f1 = np.max(np.stack([t.f1 for t in tables]), axis=0)
    neuron_f1 = np.max(np.stack([n["f1"] for n in neurons]), axis=0)
    bins = [i / 20 for i in range(21)]
    ax.hist(code_f1, bins=bins, alpha=0.7, label="best MLP code")
    ax.hist(neuron_f1, bins=bins, alpha=0.7, label="best MLP neuron (base model)")
    ax.set_xlabel("F1 for 'the current state is s'")
    ax.set_ylabel("states")
    ax.legend()
    rep.figure(fig, "codes_vs_neurons", caption="Per-state F1 of the best code vs the best neuron")


def _plot_interventions(rep: Any, inter: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(PATCH_GROUPS))
    scopes = [("codes along the transition", inter)]
    if "last_position" in inter:
        scopes.append(("last position only", inter["last_position"]))
    width = 0.8 / len(scopes)
    for i, (label, res) in enumerate(scopes):
        rates = [res[g]["success_rate"] for g in PATCH_GROUPS]
        ax.bar(x + (i - (len(scopes) - 1) / 2) * width, rates, width, label=label)
    ax.set_xticks(x, list(PATCH_GROUPS))
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate")
    ax.set_xlabel("codes patched")
    ax.legend()
    rep.figure(fig, "interventions", caption="Patching codes of state b into a sequence in state a")


def _training_section(rep: Any, cfg: DemoConfig, metrics: dict[str, Any]) -> None:
    """The stages table, and a paragraph whenever a stage was restarted."""
    rep.heading("Training")
    rep.table(
        [
            {"stage": st["stage"], "steps": st["steps"], "cap": st["cap"], "stopped": st["stopped"],
             "why": st["reason"], "seconds": st["seconds"], "CPU seconds": st["cpu_seconds"]}
            for st in metrics["stages"].values()
        ],
        caption=f"Each stage checks itself every {cfg.check_every} steps on validation walks "
        "(not the report's) and stops once converged",
    )  # fmt: skip
    events = metrics.get("restarts", {}).get("events", [])
    if events:
        rep.paragraph(
            f"Restarted {len(events)} time(s) with a fresh initialisation: "
            + "; ".join(
                f"{e['stage']} attempt {e['attempt'] + 1} (seed {e['seed']}) stalled at step "
                f"{e['step']}: {e['reason']}"
                for e in events
            )
            + ". The table shows the last attempt."
        )


def write_gate_report(out: Path, cfg: DemoConfig, metrics: dict[str, Any],
                      base_hist: list[dict[str, Any]], floor: float) -> Path:  # fmt: skip
    """The report of a run that stopped after its base stage (the base failed the gate, or
    ``base_only``)."""
    from codebook_lens.report import Report

    rep = Report("Codebook features on a finite state machine: stopped after the base model")
    why = (
        f"STOPPED: {metrics['base_gate']['reason']}. The codebook stage was not run, since "
        "codebooks trained on an unconverged base measure that base, not the method."
        if not metrics["base_gate"]["passed"]
        else "Base stage only (base_only): the codebook stage was not asked for."
    )
    rep.paragraph(
        f"{why} Seeds: training {cfg.seed}, machine {cfg.fsm_seed}. Wall time "
        f"{metrics['wall_seconds']:.0f} s, load average {metrics['load_average']['start']:.1f} "
        "at the start."
    )
    _training_section(rep, cfg, metrics)
    _plot_curves(rep, base_hist, [], floor, cfg)
    keys = ["loss", "accuracy", "transition_accuracy", "first_transition_accuracy"]
    rep.table([{"model": "base", **{k: metrics["base"][k] for k in keys}}],
              caption=f"Held-out next-token metrics (task floor loss {floor:.4f} nats)")  # fmt: skip
    return rep.write(out)


def write_report(out: Path, cfg: DemoConfig, metrics: dict[str, Any], base_hist: list[dict[str, Any]],
                 cb_hist: list[dict[str, Any]], tables: list[StateCodeTable], neurons: list[dict[str, np.ndarray]],
                 floor: float) -> Path:  # fmt: skip
    from codebook_lens.report import Report

    rep = Report("Codebook features on a finite state machine")
    lm = cfg.lm
    rep.paragraph(
        f"TokFSM with N={cfg.num_states} states and E={cfg.num_edges} out-edges, states written "
        f"as base-{cfg.base} digits. Transformer: {lm.arch}, {lm.num_layers} layers, width "
        f"{lm.width}, {lm.heads} heads, MLP {lm.mlp_width}. Codebooks on every attention head "
        f"and every MLP output, C={cfg.codebooks.num_codes}, k={cfg.codebooks.k}. Seeds: training {cfg.seed}, "
        f"machine {cfg.fsm_seed}. Wall time {metrics['wall_seconds']:.0f} s, CPU time "
        f"{metrics['cpu_seconds']:.0f} s, {metrics['threads']} torch thread(s), load average "
        f"{metrics['load_average']['start']:.1f} at the start."
    )
    rep.heading("Targets")
    rep.table(
        [{"target": text, "met": metrics["targets"][key]} for key, text in TARGETS],
        caption="The demo's targets at this seed",
    )
    _training_section(rep, cfg, metrics)
    _plot_curves(rep, base_hist, cb_hist, floor, cfg)
    rep.heading("Metrics: base vs codebook model")
    keys = [
        "loss",
        "accuracy",
        "transition_accuracy",
        "first_transition_accuracy",
        "valid_state_fraction",
    ]
    rep.table(
        [{"model": m, **{k: metrics[m][k] for k in keys}} for m in ("base", "codebook")]
        + [{"model": "reference k=1 codebook model (published)", "loss": "", "accuracy": "",
            "transition_accuracy": REFERENCE["transition_accuracy"],
            "first_transition_accuracy": REFERENCE["first_transition_accuracy"],
            "valid_state_fraction": ""}],
        caption=f"Held-out next-token metrics (task floor loss {floor:.4f} nats); the reference "
        f"row is {REFERENCE['what']}, {REFERENCE['source']}",
    )  # fmt: skip
    rep.heading("Claim 1: codes are states")
    rows = []
    for t, n in zip(tables, neurons, strict=True):
        rows.append(
            {
                "codebook": t.codebook,
                "states with a pure code": t.fraction_pure(cfg.purity_threshold),
                "mean code F1": float(t.f1.mean()),
                "states with a pure neuron": float(
                    (
                        (n["precision"] >= cfg.purity_threshold)
                        & (n["recall"] >= cfg.purity_threshold)
                    ).mean()
                ),
                "mean neuron F1": float(n["f1"].mean()),
            }
        )
    rep.table(rows, caption=f"Pure = precision and recall >= {cfg.purity_threshold}")
    rep.paragraph(
        f"Over all MLP codebooks, {metrics['state_codes']['fraction_pure']:.0%} of states have a "
        f"pure code; the best single neurons of the base model give "
        f"{metrics['neurons']['fraction_pure']:.0%}."
    )
    _plot_states(rep, tables, neurons, cfg)
    rep.heading("Claim 2: patching codes moves the state")
    inter = metrics["interventions"]
    cols = ("success_rate", "top_e_on_target", "js_to_target", "js_to_source")
    rep.paragraph(
        "A sequence ends in state a; its codes are replaced by those a sequence ending in state b "
        "produces, for the codebooks of each group. The next-state distribution is exact (the "
        "product of the digit probabilities). Headline scope: the codes at the last position of "
        "a and at each position of the next state as it is written (the b sequence continued "
        "with the same digits). With states written as several tokens, the later digits are "
        "predicted at positions after the patched one, where attention still reads a's digit "
        "tokens; the last-position-only patch below moves the first digit but not the whole "
        "next state, which is why it is not the headline."
    )
    rep.table(
        [{"patched": g, **{k: inter[g][k] for k in cols}} for g in PATCH_GROUPS],
        caption=f"{inter['pairs']} random pairs; success = {inter['criterion']}",
    )
    last = inter.get("last_position")
    if last:
        rep.table(
            [
                {
                    "patched": g,
                    **{k: last[g][k] for k in cols},
                    "next_token_tv_to_target": last[g]["next_token_tv_to_target"],
                    "next_token_tv_to_source": last[g]["next_token_tv_to_source"],
                }
                for g in PATCH_GROUPS
            ],
            caption="The same pairs, codes patched at the last position only; next_token_tv = "
            "total variation between the predicted next token (the first digit) and the true "
            "first-digit distribution after b (target) or a (source)",
        )
    _plot_interventions(rep, inter)
    return rep.write(out)


def with_flat_keys(metrics: dict[str, Any]) -> dict[str, Any]:
    """Nested metrics plus dotted aliases (``base.transition_accuracy`` ...) at the top level."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix] = value if math.isfinite(value) else None

    walk("", metrics)
    return {**metrics, **{k: v for k, v in flat.items() if "." in k}}


def summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    gate = metrics.get("base_gate", {})
    events = metrics.get("restarts", {}).get("events", [])
    restarted = [
        f"restarted: {e['stage']} attempt {e['attempt'] + 1} stalled at step {e['step']} "
        f"({e['reason']})"
        for e in events
    ]
    if "codebook" not in metrics:  # stopped at the gate, or base_only
        why = gate["reason"] if gate and not gate["passed"] else "base_only"
        return "\n".join([
            *restarted,
            f"STOPPED before the codebook stage: {why}",
            f"base transition accuracy (held-out): {metrics['base']['transition_accuracy']:.3f}",
            *([f"report: {metrics['report']}"] if "report" in metrics else []),
        ])  # fmt: skip
    b, c, i = metrics["base"], metrics["codebook"], metrics["interventions"]
    lines = [
        f"wall time: {metrics['wall_seconds']:.0f} s (CPU {metrics['cpu_seconds']:.0f} s, "
        f"{metrics['threads']} thread(s), load average {metrics['load_average']['start']:.1f})",
        *(
            f"{st['stage']}: {st['steps']} steps, {st['stopped']} ({st['reason']})"
            for st in metrics["stages"].values()
        ),
        *restarted,
        f"transition accuracy: base {b['transition_accuracy']:.3f}, codebook {c['transition_accuracy']:.3f}",
        f"first-transition accuracy: base {b['first_transition_accuracy']:.3f}, "
        f"codebook {c['first_transition_accuracy']:.3f}",
        f"loss: base {b['loss']:.4f}, codebook {c['loss']:.4f} (floor {metrics['floor_loss']:.4f})",
        f"states with a pure MLP code: {metrics['state_codes']['fraction_pure']:.0%} "
        f"(best single neurons: {metrics['neurons']['fraction_pure']:.0%})",
        "patching success: " + ", ".join(f"{g} {i[g]['success_rate']:.0%}" for g in PATCH_GROUPS),
    ]
    if "last_position" in i:
        last = i["last_position"]
        lines.append(
            "  (last position only: "
            + ", ".join(f"{g} {last[g]['success_rate']:.0%}" for g in PATCH_GROUPS)
            + ")"
        )
    held = [text for key, text in TARGETS if metrics["targets"][key]]
    lines.append(f"targets met: {len(held)}/{len(TARGETS)}")
    lines += [f"  NOT MET: {text}" for key, text in TARGETS if not metrics["targets"][key]]
    if "report" in metrics:
        lines.append(f"report: {metrics['report']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- several seeds
SUMMARY_METRICS: tuple[tuple[str, str, Literal["min", "max"]], ...] = (
    ("base.transition_accuracy", "base TA", "min"),
    ("codebook.transition_accuracy", "codebook TA", "min"),
    ("gap", "base - codebook TA", "max"),
    ("base.first_transition_accuracy", "base first-transition", "min"),
    ("codebook.first_transition_accuracy", "codebook first-transition", "min"),
    ("state_codes.fraction_pure", "pure MLP code", "min"),
    ("neurons.fraction_pure", "pure neuron", "max"),
    ("interventions.all.success_rate", "patching all", "min"),
    ("training.base_steps", "base steps", "max"),
    ("training.codebook_steps", "codebook steps", "max"),
    ("wall_seconds", "wall s", "max"),
    ("cpu_seconds", "CPU s", "max"),
)
"""Per-seed columns of the summary: metrics.json key, column, which extreme is the worst."""


def _metric(metrics: dict[str, Any], key: str) -> float:
    """``key`` of a run's metrics (NaN where the run has none: stopped at the gate)."""
    try:
        if key == "gap":
            return float(
                metrics["base"]["transition_accuracy"] - metrics["codebook"]["transition_accuracy"]
            )
        value: Any = metrics
        for part in key.split("."):
            value = value[part]
    except KeyError:
        return math.nan
    return float(value)


def summarize_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows, mean and worst per metric, and how many seeds met each target."""
    rows = []
    for s, m in runs.items():
        row: dict[str, Any] = {"seed": s}
        row.update({key: _metric(m, key) for key, _, _ in SUMMARY_METRICS})
        row["stages"] = {
            name: {k: st[k] for k in ("steps", "cap", "stopped", "reason")}
            for name, st in m["stages"].items()
        }
        row["targets"] = check_targets(m)
        row["gate"] = m.get("base_gate", {"passed": True, "reason": ""})
        row["restarts"] = m.get("restarts", {"count": 0, "events": []})["count"]
        row["caps_hit"] = list(
            m.get("caps_hit", [n for n, st in m["stages"].items() if st["stopped"] == "step cap"])
        )
        row["threads"] = m.get("threads")
        row["load_average"] = m.get("load_average")
        rows.append(row)
    agg = {}
    for key, _, worst in SUMMARY_METRICS:
        values = np.array([r[key] for r in rows], dtype=float)
        if np.isnan(values).all():
            agg[key] = {"mean": math.nan, "worst": math.nan, "worst_seed": None}
            continue
        pick = int(np.nanargmin(values) if worst == "min" else np.nanargmax(values))
        agg[key] = {
            "mean": float(np.nanmean(values)),
            "worst": float(values[pick]),
            "worst_seed": rows[pick]["seed"],
        }
    held = {key: sum(r["targets"][key] for r in rows) for key, _ in TARGETS}
    return {
        "seeds": [r["seed"] for r in rows],
        "per_seed": rows,
        "aggregate": agg,
        "targets_held": held,
        "all_targets_held": sum(all(r["targets"].values()) for r in rows),
        "gate_failed": [r["seed"] for r in rows if not r["gate"]["passed"]],
        "base_only": [
            r["seed"] for r in rows if r["gate"]["passed"] and "codebook" not in runs[r["seed"]]
        ],
        "restarts": sum(r["restarts"] for r in rows),
        "caps_hit": sum(bool(r["caps_hit"]) for r in rows),
        "reference": REFERENCE,
    }


def seeds_report(cfg: DemoConfig, data: dict[str, Any]) -> Any:
    """The summary report of a multi-seed run (a ``report.Report``)."""
    from codebook_lens.report import Report

    n = len(data["seeds"])
    rep = Report(f"FSM demo at {n} seeds")
    rep.paragraph(
        f"Seeds {', '.join(map(str, data['seeds']))}: each runs the whole demo with a fresh "
        f"machine and initialisation (--seed S --fsm-seed S); one folder per seed holds its "
        f"report. Model: {cfg.lm.arch}, {cfg.lm.num_layers} layers, width {cfg.lm.width}, MLP "
        f"{cfg.lm.mlp_width}; caps {cfg.base_training.steps} + {cfg.codebook_training.steps} steps."
    )
    rep.heading("Targets")
    if len(data.get("base_only", [])) == n:
        rep.paragraph("Not measured: every seed ran the base stage only (base_only).")
    else:
        rep.table(
            [
                {"target": text, "seeds where it held": f"{data['targets_held'][key]}/{n}"}
                for key, text in TARGETS
            ]
            + [{"target": "all of them", "seeds where it held": f"{data['all_targets_held']}/{n}"}],
        )
    rep.heading("Per seed")
    cols = [label for _, label, _ in SUMMARY_METRICS]
    table = []
    for r in data["per_seed"]:
        row: dict[str, Any] = {"seed": r["seed"]}
        row.update({label: r[key] for key, label, _ in SUMMARY_METRICS})
        row["targets met"] = f"{sum(r['targets'].values())}/{len(TARGETS)}"
        row["restarts"] = r.get("restarts", 0)
        row["caps hit"] = ", ".join(r.get("caps_hit", [])) or "-"
        if not r.get("gate", {"passed": True})["passed"]:
            row["targets met"] += " (stopped: base unconverged)"
        table.append(row)
    for stat in ("mean", "worst"):
        row = {"seed": stat}
        row.update({label: data["aggregate"][key][stat] for key, label, _ in SUMMARY_METRICS})
        table.append(row)
    rep.table(
        table,
        columns=["seed", *cols, "targets met", "restarts", "caps hit"],
        caption="TA = sampled transition accuracy; worst = the lowest (highest for the gap, the "
        "neurons, the steps and the times) over the seeds",
    )
    rep.paragraph(
        f"Seeds stopped at the gate (base model unconverged, no codebook stage): "
        f"{', '.join(map(str, data.get('gate_failed', []))) or 'none'}. Restarts of stalled "
        f"stages: {data.get('restarts', 0)}. Seeds where some stage hit its step cap: "
        f"{data.get('caps_hit', 0)}/{n}."
    )
    rep.heading("How each stage stopped")
    rep.table(
        [
            {"seed": r["seed"], "stage": name, "steps": st["steps"], "cap": st["cap"],
             "stopped": st["stopped"], "why": st["reason"]}
            for r in data["per_seed"]
            for name, st in r["stages"].items()
        ]
    )  # fmt: skip
    ref = data["reference"]
    rep.heading("The reference's published figures")
    rep.table(
        [
            {"model": f"reference ({ref['what']})", "transition accuracy":
             ref["transition_accuracy"], "first-transition accuracy":
             ref["first_transition_accuracy"]},
            {"model": f"ours, codebook model, mean over {n} seeds", "transition accuracy":
             data["aggregate"]["codebook.transition_accuracy"]["mean"],
             "first-transition accuracy":
             data["aggregate"]["codebook.first_transition_accuracy"]["mean"]},
        ],
        caption=f"Source: {ref['source']}",
    )  # fmt: skip
    loads = [r["load_average"]["start"] for r in data["per_seed"] if r.get("load_average")]
    if loads:
        rep.paragraph(
            f"Load average at the start of each seed: {min(loads):.1f} to {max(loads):.1f} "
            f"(threads: {sorted({r['threads'] for r in data['per_seed']})}). Wall times on a "
            "shared machine grow with the load; CPU times less so."
        )
    return rep


def seeds_summary(data: dict[str, Any]) -> str:
    """A few terminal lines for a multi-seed run."""
    n = len(data["seeds"])
    agg = data["aggregate"]
    lines = [f"{n} seeds: {', '.join(map(str, data['seeds']))}"]
    for key, label, _ in SUMMARY_METRICS:
        lines.append(
            f"  {label}: mean {agg[key]['mean']:.4g}, worst {agg[key]['worst']:.4g} "
            f"(seed {agg[key]['worst_seed']})"
        )
    if len(data.get("base_only", [])) == n:
        lines.append("targets: not measured (base_only: no codebook stage)")
    else:
        for key, text in TARGETS:
            lines.append(f"{text}: held at {data['targets_held'][key]}/{n} seeds")
        lines.append(f"all targets: {data['all_targets_held']}/{n} seeds")
    lines.append(
        f"restarts: {data.get('restarts', 0)}; seeds with a stage at its step cap: "
        f"{data.get('caps_hit', 0)}/{n}; stopped at the gate (base unconverged): "
        f"{', '.join(map(str, data.get('gate_failed', []))) or 'none'}"
    )
    if "report" in data:
        lines.append(f"report: {data['report']}")
    return "\n".join(lines)
