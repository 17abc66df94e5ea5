"""Run the FSM demo once (``run_demo``) or at several seeds (``run_seeds``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from codebook_lens import threads
from codebook_lens.config import write_bytes_atomic, write_json_atomic
from codebook_lens.experiments.fsm.config import DemoConfig
from codebook_lens.experiments.fsm.data import (
    TokFSM,
)
from codebook_lens.experiments.fsm.metrics import (
    StateCodeTable,
    check_targets,
    claim_one_tables,
    model_metrics,
    pure_states,
)
from codebook_lens.experiments.fsm.patching import intervention_experiment
from codebook_lens.experiments.fsm.report import (
    seeds_report,
    summarize_seeds,
    with_flat_keys,
    write_gate_report,
    write_report,
)
from codebook_lens.experiments.fsm.stages import (
    ConvergenceCheck,
    FSMBatches,
    StageResult,
    Validation,
    build_base_model,
    restart_seed,
    train_stage,
)
from codebook_lens.model.codebook_model import CodebookModel
from codebook_lens.training.loop import TrainConfig
from codebook_lens.training.pipeline import with_codebooks


# ---------------------------------------------------------------------- run
def run_demo(
    cfg: DemoConfig, out_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Run the whole demo; returns ``metrics`` (also written to ``<out>/metrics.json``).

    Everything is written into a temporary folder first and renamed at the end, so a crashed
    or interrupted run leaves no half-written report behind.
    """
    t0 = time.time()
    out = (
        Path(out_dir) if out_dir is not None else Path("runs") / time.strftime("fsm-%Y%m%d-%H%M%S")
    )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r} already exists and is not empty; choose a new folder")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with threads.use(cfg.threads, announce=progress):
            metrics = _run(cfg, tmp, t0, progress)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics["report"] = str(out / "report.html")
    return metrics


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[fsm demo] {msg}", flush=True)


class _Trained(NamedTuple):
    """The two models of a run and how their stages went."""

    base: nn.Module
    model: CodebookModel | None
    """None when the base failed the gate (no codebook stage ran)."""
    stages: list[StageResult]
    base_metrics: dict[str, float]
    """The base model's metrics, measured before the fine-tuning."""
    gate: str = ""
    """Why the codebook stage did not run ("" when it did)."""


def _run(cfg: DemoConfig, out: Path, t0: float, progress: bool) -> dict[str, Any]:
    c0, load0 = time.process_time(), _load_average()
    fsm = TokFSM(cfg.fsm_config())
    write_json_atomic(out / "fsm.json", fsm.to_json())
    write_json_atomic(out / "demo_config.json", dataclasses.asdict(cfg))
    eval_tokens, eval_states = fsm.sample_with_states(
        cfg.eval_sequences, torch.Generator().manual_seed(cfg.seed + 1)
    )
    trained = _train_models(cfg, fsm, out, eval_tokens, progress)
    base_res, stages = trained.stages[0], trained.stages
    base_metrics = trained.base_metrics
    if trained.model is None:
        _log(f"STOPPED before the codebook stage: {trained.gate or 'base_only'}", progress)
        metrics = {
            "base": base_metrics, "floor_loss": fsm.floor_loss,
            "training": {"base_seconds": base_res.seconds, "base_tokens": base_res.tokens,
                         "base_steps": base_res.steps},
            "stages": {base_res.stage: base_res.to_json()}, "threads": torch.get_num_threads(),
            **_outcome(stages, trained.gate),
        }  # fmt: skip
        metrics["targets"] = check_targets(metrics)
        _finish(out, metrics, t0, c0, load0,
                lambda: write_gate_report(out, cfg, metrics, base_res.history, fsm.floor_loss))  # fmt: skip
        return metrics
    trained.model.eval()
    cb_metrics = model_metrics(trained.model, fsm, eval_tokens, cfg)

    # 3. claim 1: state codes vs neurons, at the tokens that complete a state
    _log("state codes and neuron baseline", progress)
    tables, neurons = claim_one_tables(
        trained.model, trained.base, fsm, eval_tokens, eval_states, cfg
    )

    # 4. claim 2: interventions
    _log("interventions", progress)
    inter = intervention_experiment(trained.model, fsm, cfg)

    metrics = _metrics(cfg, fsm, base_metrics, cb_metrics, tables, neurons, inter, stages)
    metrics.update(_outcome(stages, ""))
    write_json_atomic(out / "state_codes.json", _state_rows(fsm, tables))
    cb_hist, offset = [], 0
    for st in stages[1:]:
        cb_hist += [{**r, "step": r["step"] + offset} for r in st.history]
        offset += st.steps
    _finish(out, metrics, t0, c0, load0, lambda: write_report(
        out, cfg, metrics, base_res.history, cb_hist, tables, neurons, fsm.floor_loss))  # fmt: skip
    return metrics


def _outcome(stages: list[StageResult], gate: str) -> dict[str, Any]:
    """The run's gate, restarts and caps (metrics.json ``base_gate``, ``restarts``,
    ``caps_hit``)."""
    events = [{"stage": st.stage, **r} for st in stages for r in st.restarts]
    return {
        "base_gate": {"passed": not gate, "reason": gate},
        "restarts": {"count": len(events), "events": events},
        "caps_hit": [st.stage for st in stages if st.stopped == "step cap"],
    }


def _finish(out: Path, metrics: dict[str, Any], t0: float, c0: float, load0: float,
            write: Callable[[], Any]) -> None:  # fmt: skip
    """Add the times to ``metrics``, ``write`` the report and write metrics.json."""
    for _ in range(2):  # the report shows the times; the second pass includes writing it
        metrics["wall_seconds"] = time.time() - t0
        metrics["cpu_seconds"] = time.process_time() - c0
        metrics["load_average"] = {"start": load0, "end": _load_average()}
        write()
    write_json_atomic(out / "metrics.json", with_flat_keys(metrics))


def _stage_config(cfg: DemoConfig, stage: TrainConfig, progress: bool) -> TrainConfig:
    """A stage's optimisation as run: both stages log at the checks' rhythm (without checks,
    about 60 times over the base cap), with the demo's seed."""
    base_cap = cfg.base_training.steps
    log_every = math.gcd(cfg.check_every, 25) if cfg.check_every else max(1, base_cap // 60)
    return dataclasses.replace(stage, log_every=log_every, seed=cfg.seed, progress=progress)


def train_base(
    cfg: DemoConfig, fsm: TokFSM, out: Path, val: Validation, eval_batches: list[Tensor],
    progress: bool = False,
) -> tuple[nn.Module, StageResult, ConvergenceCheck | None]:  # fmt: skip
    """Stage 1: the base model from scratch, restarted with a fresh initialisation (at most
    ``cfg.max_restarts`` times) whenever it stalls; the last attempt's model, result (its
    ``restarts`` list the stalled attempts) and check. Attempt r trains in
    ``out/base_training`` (r = 0) or ``out/base_training_restart<r>``."""
    train_cfg = _stage_config(cfg, cfg.base_training, progress)
    restarts: list[dict[str, Any]] = []
    for attempt in range(cfg.max_restarts + 1):
        seed = restart_seed(cfg.seed, attempt)
        base = build_base_model(cfg, fsm, seed)
        check = None
        if cfg.check_every:
            check = ConvergenceCheck(base, fsm, cfg, val, detect_stalls=attempt < cfg.max_restarts)
        folder = out / ("base_training" if attempt == 0 else f"base_training_restart{attempt}")
        res = train_stage("base", base, FSMBatches(fsm, train_cfg.batch_size, seed),
                          dataclasses.replace(train_cfg, seed=seed), folder, check, eval_batches)  # fmt: skip
        if res.stopped != "stalled":
            break
        restarts.append({"attempt": attempt, "seed": seed, "step": res.steps, "reason": res.reason,
                         "seconds": res.seconds})  # fmt: skip
        _log(f"base model stalled at step {res.steps} ({res.reason}); restarting with a fresh "
             f"initialisation (seed {restart_seed(cfg.seed, attempt + 1)})", progress)  # fmt: skip
    res.restarts = restarts
    return base, res, check


def gate_failure(cfg: DemoConfig, base_res: StageResult) -> str:
    """Why the codebook stage must not start from this base ("" when it may)."""
    if not cfg.base_gate or not cfg.check_every or base_res.stopped == "converged":
        return ""
    restarts = len(base_res.restarts)
    tried = f" after {restarts} restart(s)" if restarts else ""
    return (
        f"the base model did not reach its criterion (validation transition accuracy >= "
        f"{cfg.base_target:.0%}){tried}: {base_res.stopped} at step {base_res.steps}, "
        f"{base_res.reason}"
    )


def _train_models(
    cfg: DemoConfig, fsm: TokFSM, out: Path, eval_tokens: Tensor, progress: bool
) -> _Trained:
    """Stage 1, the base model from scratch, and stage 2, the codebook model fine-tuned from a
    copy of it (so the base stays for comparison); both are saved under ``out``. Stage 2 is
    skipped (``model`` None) when the base fails the gate (``gate_failure``)."""
    eval_batches = [eval_tokens[i : i + 64] for i in range(0, min(len(eval_tokens), 256), 64)]
    val = Validation.make(fsm, cfg)
    _log("training the base model", progress)
    base, base_res, check = train_base(cfg, fsm, out, val, eval_batches, progress)
    base.save_pretrained(out / "base_model")  # type: ignore[operator]
    _log(f"base model: {base_res.steps} steps in {base_res.seconds:.0f} s ({base_res.stopped}: "
         f"{base_res.reason}); evaluating", progress)  # fmt: skip
    base_metrics = model_metrics(base, fsm, eval_tokens, cfg)
    gate = gate_failure(cfg, base_res)
    if gate or cfg.base_only:
        return _Trained(base, None, [base_res], base_metrics, gate)
    if check is not None and not check.checks:  # stopped before its first check
        check.checks.append({"step": base_res.steps, **check.measure()})
    reference = check.checks[-1]["transition_accuracy"] if check is not None else None

    _log("fine-tuning the codebook model", progress)
    cb_base = build_base_model(cfg, fsm)
    cb_base.load_state_dict(base.state_dict())
    model = with_codebooks(cb_base, cfg.codebook_config())
    assert isinstance(model, CodebookModel)
    warm = cfg.codebook_warmup_steps
    cb_cfg = dataclasses.replace(
        _stage_config(cfg, cfg.codebook_training, progress),
        steps=cfg.codebook_training.steps - warm,
        seed=cfg.seed + 1,
    )
    stages = [base_res]
    if warm:
        warm_cfg = dataclasses.replace(cb_cfg, steps=warm, model_lr_factor=0.0, schedule="constant",
                                       seed=cfg.seed + 2)  # fmt: skip
        stages.append(train_stage("codebook warm-up", model, FSMBatches(fsm, cb_cfg.batch_size, cfg.seed + 2),
                                  warm_cfg, out / "codebook_warmup", None, eval_batches))  # fmt: skip
    cb_check = ConvergenceCheck(model, fsm, cfg, val, reference) if cfg.check_every else None
    cb_res = train_stage("codebook", model, FSMBatches(fsm, cb_cfg.batch_size, cfg.seed + 1), cb_cfg,
                         out / "codebook_training", cb_check, eval_batches)  # fmt: skip
    stages.append(cb_res)
    model.save_pretrained(out / "codebook_model")
    _log(f"codebook model: {cb_res.steps} steps in {cb_res.seconds:.0f} s ({cb_res.stopped}: "
         f"{cb_res.reason}); evaluating", progress)  # fmt: skip
    return _Trained(base, model, stages, base_metrics)


def _metrics(
    cfg: DemoConfig,
    fsm: TokFSM,
    base_metrics: dict[str, float],
    cb_metrics: dict[str, float],
    tables: list[StateCodeTable],
    neurons: list[dict[str, np.ndarray]],
    inter: dict[str, Any],
    stages: list[StageResult],
) -> dict[str, Any]:
    """The run's metrics (without the times), targets included."""
    th = cfg.purity_threshold
    pure_code = pure_states(tables, th)
    pure_neuron = np.zeros(fsm.num_states, dtype=bool)
    for n in neurons:
        pure_neuron |= (n["precision"] >= th) & (n["recall"] >= th)
    base_res = stages[0]
    metrics: dict[str, Any] = {
        "base": base_metrics,
        "codebook": cb_metrics,
        "floor_loss": fsm.floor_loss,
        "state_codes": {
            "fraction_pure": float(pure_code.mean()),
            "per_codebook": {t.codebook: t.fraction_pure(th) for t in tables},
            "mean_best_f1": float(np.max(np.stack([t.f1 for t in tables]), axis=0).mean()),
            "threshold": th,
        },
        "neurons": {
            "fraction_pure": float(pure_neuron.mean()),
            "mean_best_f1": float(np.max(np.stack([n["f1"] for n in neurons]), axis=0).mean()),
            "what": "hidden MLP neurons of the base model, best neuron and threshold per state",
        },
        "interventions": inter,
        "training": {
            "base_seconds": base_res.seconds,
            "codebook_seconds": sum(r.seconds for r in stages[1:]),
            "base_tokens": base_res.tokens,
            "codebook_tokens": sum(r.tokens for r in stages[1:]),
            "base_steps": base_res.steps,
            "codebook_steps": sum(r.steps for r in stages[1:]),
        },
        "stages": {r.stage: r.to_json() for r in stages},
        "threads": torch.get_num_threads(),
    }
    metrics["targets"] = check_targets(metrics)
    return metrics


def _state_rows(fsm: TokFSM, tables: list[StateCodeTable]) -> list[dict[str, Any]]:
    """Per state, its best code over the MLP codebooks (``state_codes.json``)."""
    rows = []
    for s in range(fsm.num_states):
        best = max(tables, key=lambda t: t.f1[s])
        rows.append(
            {"state": s, "codebook": best.codebook, "code": int(best.code[s]),
             "precision": float(best.precision[s]), "recall": float(best.recall[s])}
        )  # fmt: skip
    return rows


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-4"``, ``"0,2,5-7"`` or ``"3"``: a comma list of integers and ranges."""
    seeds: list[int] = []
    for part in str(text).split(","):
        item = part.strip()
        lo, sep, hi = item.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else range(int(item), int(item) + 1)
        except ValueError:
            span = range(0)
        if not item or not span or span.start < 0:
            raise ValueError(
                f"seeds={text!r} is invalid at {item!r}; give integers >= 0 and ranges a-b "
                "with a <= b, separated by commas (e.g. '0-4' or '0,2,5-7')"
            )
        seeds += [s for s in span if s not in seeds]
    return seeds


def finished_run(folder: Path, cfg: DemoConfig) -> dict[str, Any] | None:
    """The metrics of a complete earlier run of ``cfg`` in ``folder`` (None: no such run)."""
    if not (folder / "metrics.json").is_file() or not (folder / "demo_config.json").is_file():
        return None
    saved = json.loads((folder / "demo_config.json").read_text())
    wanted = dataclasses.asdict(cfg)
    if {k: v for k, v in saved.items() if k != "threads"} != {
        k: v for k, v in wanted.items() if k != "threads"
    }:
        return None
    metrics: dict[str, Any] = json.loads((folder / "metrics.json").read_text())
    return metrics


def run_seeds(
    cfg: DemoConfig,
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo at each seed (``seed = fsm_seed = S``: a fresh machine and initialisation)
    into ``<out>/seed-S/`` and write ``<out>/summary.md``, ``summary.html``, ``summary.json``.

    Each seed's folder is written atomically, so an interrupted run can be continued: a seed
    whose folder holds a finished run of the same settings is reused, not re-run.
    """
    if not seeds:
        raise ValueError("seeds=[] is invalid; give at least one seed")
    out = (
        Path(out_dir)
        if out_dir is not None
        else Path("runs") / time.strftime("fsm-seeds-%Y%m%d-%H%M%S")
    )
    configs = {s: dataclasses.replace(cfg, seed=s, fsm_seed=s) for s in seeds}
    for s, c in configs.items():  # refuse before anything runs
        folder = out / f"seed-{s}"
        if folder.exists() and any(folder.iterdir()) and finished_run(folder, c) is None:
            raise ValueError(
                f"out={str(out)!r} holds {folder.name}/, which is not a finished run of these "
                "settings; choose a new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, Any]] = {}
    for s, c in configs.items():
        folder = out / f"seed-{s}"
        done = finished_run(folder, c)
        if done is not None:
            _log(f"seed {s}: reusing the finished run in {folder}", progress)
            runs[s] = done
            continue
        _log(f"seed {s} ({len(runs) + 1}/{len(configs)})", progress)
        runs[s] = run_demo(c, folder, progress=progress)
    summary_data = summarize_seeds(runs)
    write_json_atomic(out / "summary.json", summary_data)
    rep = seeds_report(cfg, summary_data)
    write_bytes_atomic(out / "summary.md", rep.to_markdown().encode("utf-8"))
    write_bytes_atomic(out / "summary.html", rep.to_html().encode("utf-8"))
    summary_data["report"] = str(out / "summary.html")
    return summary_data
