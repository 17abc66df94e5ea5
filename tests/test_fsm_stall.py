"""FSM demo: the stall detector, the restarts and the gate before the codebook stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codebook_lens.cli import main
from codebook_lens.experiments.fsm import ConvergenceCheck, DemoConfig
from codebook_lens.experiments.fsm.data import TokFSM
from codebook_lens.experiments.fsm.run import gate_failure
from codebook_lens.experiments.fsm.stages import (
    StageResult,
    Stalled as _Stalled,
    restart_seed,
    stall_reason,
)


def _curve(*points: tuple[int, float]) -> list[dict[str, float]]:
    return [{"step": s, "transition_accuracy": ta} for s, ta in points]


CFG = DemoConfig(stall_steps=400, stall_chance=0.2, stall_gain=0.01, stall_below=0.05,
                 base_target=0.97)  # fmt: skip


def test_at_chance_for_the_window_is_a_stall() -> None:
    at_chance = _curve((100, 0.11), (200, 0.12), (300, 0.10), (400, 0.13))
    assert "at chance" in stall_reason(at_chance, CFG) and "400 steps" in stall_reason(
        at_chance, CFG
    )
    assert stall_reason(at_chance[:3], CFG) == ""  # the window is not over yet
    left = _curve((100, 0.11), (200, 0.12), (300, 0.35), (400, 0.40))
    assert stall_reason(left, CFG) == ""  # it left chance: no stall


def test_a_plateau_well_below_the_target_is_a_stall() -> None:
    plateau = _curve((100, 0.1), (200, 0.6), (300, 0.88), (400, 0.885), (500, 0.887),
                     (600, 0.884), (700, 0.889))  # fmt: skip
    reason = stall_reason(plateau, CFG)
    assert "plateau" in reason and "88.9%" in reason
    # At 700 the best gained 0.9 points over 300-700; at 600 it had gained 28.7 over 200-600.
    assert stall_reason(plateau[:-1], CFG) == ""
    climbing = _curve((100, 0.1), (200, 0.5), (300, 0.7), (400, 0.8), (500, 0.85), (600, 0.9))
    assert stall_reason(climbing, CFG) == ""
    near = _curve((100, 0.9), (200, 0.95), (300, 0.951), (400, 0.95), (500, 0.952), (600, 0.95))
    assert stall_reason(near, CFG) == ""  # within 5 points of the target: it goes on
    off = DemoConfig(stall_steps=0)
    assert stall_reason(_curve((100, 0.1), (5000, 0.1)), off) == ""


def test_check_raises_stalled_only_when_asked() -> None:
    cfg = DemoConfig.quick(check_every=10, stall_steps=20)
    fsm = TokFSM(cfg.fsm_config())
    for detect in (False, True):
        check = ConvergenceCheck(torch.nn.Linear(1, 1), fsm, cfg, None, detect_stalls=detect)  # type: ignore[arg-type]
        check.measure = lambda: {"transition_accuracy": 0.1}  # type: ignore[method-assign]
        check(10, {"step": 10, "lm_loss": 2.3})
        if detect:
            with pytest.raises(_Stalled):
                check(20, {"step": 20, "lm_loss": 2.3})
            assert "at chance" in check.stalled
        else:
            check(20, {"step": 20, "lm_loss": 2.3})
            assert check.stalled == ""
    # A codebook stage (a reference accuracy) never counts as stalled.
    assert not ConvergenceCheck(torch.nn.Linear(1, 1), fsm, cfg, None, 0.9,  # type: ignore[arg-type]
                                detect_stalls=True).detect_stalls  # fmt: skip


def _stage(stopped: str) -> StageResult:
    return StageResult("base", 300, 300, stopped, "why", 1.0, 1.0, 10, [])  # type: ignore[arg-type]


def test_gate() -> None:
    cfg = DemoConfig()
    assert gate_failure(cfg, _stage("converged")) == ""
    assert "did not reach its criterion" in gate_failure(cfg, _stage("step cap"))
    assert gate_failure(DemoConfig(base_gate=False), _stage("step cap")) == ""
    assert gate_failure(DemoConfig(check_every=0), _stage("step cap")) == ""
    assert restart_seed(5, 0) == 5 and len({restart_seed(5, a) for a in range(3)}) == 3


def test_unconverged_base_restarts_then_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["demo", "--quick", "--base-gate", "--base-steps", "20", "--base-lr", "1e-7",
            "--check-every", "10", "--stall-steps", "20", "--max-restarts", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "STOPPED before the codebook stage" in printed and "restarted" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_gate"]["passed"] is False
    assert "did not reach its criterion" in metrics["base_gate"]["reason"]
    assert metrics["restarts"]["count"] == 1
    event = metrics["restarts"]["events"][0]
    assert (event["stage"], event["step"], event["seed"]) == ("base", 20, 0)
    assert "at chance" in event["reason"]
    assert metrics["caps_hit"] == ["base"] and "codebook" not in metrics
    assert not any(metrics["targets"].values())
    assert not (out / "codebook_model").exists() and (out / "base_model").is_dir()
    assert (out / "base_training_restart1").is_dir()
    report = (out / "report.md").read_text()
    assert "STOPPED" in report and "Restarted 1 time(s)" in report


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_base_warmup(value: object) -> None:
    with pytest.raises(ValueError, match=f"base_warmup_steps={value!r} is invalid"):
        DemoConfig(base_warmup_steps=value)  # type: ignore[arg-type]


def test_base_only_stops_after_the_base_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["demo", "--quick", "--base-only", "--base-steps", "20", "--eval-sequences", "16",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "codebook" not in metrics and metrics["base_gate"]["passed"]
    assert set(metrics["stages"]) == {"base"} and (out / "base_model").is_dir()
    assert not (out / "codebook_model").exists()
    assert "Base stage only" in (out / "report.md").read_text()


def test_base_only_seeds_summary_measures_no_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--quick", "--base-only", "--base-steps", "20", "--eval-sequences", "16",
                 "--seeds", "0-1", "--out", str(tmp_path / "runs")])  # fmt: skip
    assert code == 0
    assert "targets: not measured (base_only" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["base_only"] == [0, 1] and not summary["gate_failed"]
    assert "Not measured" in (tmp_path / "runs" / "summary.md").read_text()
