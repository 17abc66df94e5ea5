"""The FSM demo's training stages: batches, the base model, the stop criterion, a stage."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from codebook_lens.experiments.fsm.config import DemoConfig
from codebook_lens.experiments.fsm.data import (
    TokFSM,
    first_transition_accuracy,
    sample_sequences,
    transition_stats,
)
from codebook_lens.experiments.fsm.metrics import mlp_state_tables, pure_states, state_positions
from codebook_lens.model.codebook_model import CodebookModel, eval_mode
from codebook_lens.training.base_models import Vocab
from codebook_lens.training.loop import TrainConfig
from codebook_lens.training.pipeline import StopTraining, build_base, fit


class FSMBatches:
    """An endless, seeded stream of TokFSM training batches with a resumable state."""

    def __init__(self, fsm: TokFSM, batch_size: int, seed: int) -> None:
        self.fsm, self.batch_size = fsm, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> FSMBatches:
        return self

    def __next__(self) -> Tensor:
        return self.fsm.sample(self.batch_size, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def build_base_model(cfg: DemoConfig, fsm: TokFSM, seed: int | None = None) -> nn.Module:
    """A randomly initialised HF causal LM of ``cfg.model_config()`` for the FSM vocabulary,
    seeded by ``seed`` (default ``cfg.seed``)."""
    vocab = Vocab(fsm.vocab_size, fsm.bos_id, fsm.eos_id)
    return build_base(cfg.model_config(), vocab, seed=cfg.seed if seed is None else seed)


def restart_seed(seed: int, attempt: int) -> int:
    """The initialisation (and batch) seed of base attempt ``attempt`` (0: ``seed`` itself)."""
    return seed + 100_003 * attempt


class Converged(StopTraining):
    """Raised by a ``ConvergenceCheck`` inside ``train`` to end its stage early."""


class Stalled(StopTraining):
    """Raised by a ``ConvergenceCheck`` inside ``train`` when the base stage has stalled."""


def stall_reason(checks: Sequence[dict[str, float]], cfg: DemoConfig) -> str:
    """Why a base stage with these checks (step, transition_accuracy) counts as stalled after
    the last one ("" while it does not): at chance for ``cfg.stall_steps`` steps, or a plateau
    (best accuracy gained < ``cfg.stall_gain`` over that many steps) more than
    ``cfg.stall_below`` under ``cfg.base_target``."""
    if not cfg.stall_steps or not checks or checks[-1]["step"] < cfg.stall_steps:
        return ""
    step = int(checks[-1]["step"])
    best = max(c["transition_accuracy"] for c in checks)
    if best < cfg.stall_chance:
        return (
            f"at chance: transition accuracy at most {best:.1%} (< {cfg.stall_chance:.0%}) "
            f"for {step} steps"
        )
    before = [c["transition_accuracy"] for c in checks if c["step"] <= step - cfg.stall_steps]
    if not before or best >= cfg.base_target - cfg.stall_below:
        return ""
    gain = best - max(before)
    if gain >= cfg.stall_gain:
        return ""
    return (
        f"plateau: best transition accuracy {best:.1%} gained {gain:.1%} (< {cfg.stall_gain:.0%}) "
        f"over the last {cfg.stall_steps} steps, more than {cfg.stall_below:.0%} under the "
        f"target {cfg.base_target:.0%}"
    )


@dataclass
class Validation:
    """Validation data for the stop criterion (disjoint seeds from the report's data)."""

    tokens: Tensor
    """``(B, L)`` held-out walks."""
    ends: Tensor
    """``(S,)`` positions that complete a state."""
    labels: Tensor
    """``(B, S)`` the state completed at each of those positions."""
    sample_seed: int
    """Seed of the sequences sampled from BOS at every check (the same draws each time)."""

    @classmethod
    def make(cls, fsm: TokFSM, cfg: DemoConfig) -> Validation:
        tokens, states = fsm.sample_with_states(
            2 * cfg.check_sequences, torch.Generator().manual_seed(cfg.seed + 3)
        )
        ends, labels = state_positions(fsm, tokens, states)
        return cls(tokens, ends, labels, cfg.seed + 5)


class ConvergenceCheck:
    """A ``train`` callback that measures the model every ``cfg.check_every`` steps and ends the
    stage once it has converged.

    Each check: transition accuracy of ``cfg.check_sequences`` walks sampled from BOS, exact
    first-transition accuracy and, for a codebook model, the fraction of states with a pure MLP
    code on the validation walks. Converged: the base model once its transition accuracy is
    ``>= cfg.base_target``; the codebook model once its transition accuracy is within
    ``cfg.codebook_gap`` of ``reference`` (the base model's at its last check) and its pure-state
    fraction moved by at most ``cfg.purity_tolerance`` since the previous check.
    """

    def __init__(self, model: nn.Module, fsm: TokFSM, cfg: DemoConfig, val: Validation,
                 reference: float | None = None, *, detect_stalls: bool = False) -> None:  # fmt: skip
        self.model, self.fsm, self.cfg, self.val = model, fsm, cfg, val
        self.reference = reference
        self.detect_stalls = detect_stalls and reference is None
        """Also end a base stage that has stalled (``stall_reason``); ``stalled`` says why."""
        self.checks: list[dict[str, float]] = []
        self.reason = ""
        self.stalled = ""

    def measure(self) -> dict[str, float]:
        model, fsm, cfg = self.model, self.fsm, self.cfg
        with eval_mode(model), torch.no_grad():
            gen = torch.Generator().manual_seed(self.val.sample_seed)
            samples = sample_sequences(model, fsm, cfg.check_sequences, gen, cfg.seq_len)
            out = {
                "transition_accuracy": transition_stats(fsm, samples)["transition_accuracy"],
                "first_transition_accuracy": first_transition_accuracy(model, fsm),
            }
            if isinstance(model, CodebookModel):
                tables = mlp_state_tables(model, self.val.tokens, self.val.ends, self.val.labels,
                                          fsm.num_states, cfg)  # fmt: skip
                out["fraction_pure"] = float(pure_states(tables, cfg.purity_threshold).mean())
        return out

    def converged(self) -> str:
        """Why the stage has converged after the last check ("" while it has not)."""
        cfg, last = self.cfg, self.checks[-1]
        ta = last["transition_accuracy"]
        if self.reference is None:
            if ta >= cfg.base_target:
                return f"transition accuracy {ta:.1%} >= {cfg.base_target:.1%}"
            return ""
        if len(self.checks) < 2 or ta < self.reference - cfg.codebook_gap:
            return ""
        moved = abs(last["fraction_pure"] - self.checks[-2]["fraction_pure"])
        if moved > cfg.purity_tolerance:
            return ""
        return (
            f"transition accuracy {ta:.1%} within {cfg.codebook_gap:.0%} of the base's "
            f"{self.reference:.1%}; pure states {last['fraction_pure']:.0%} (moved "
            f"{moved:.0%} <= {cfg.purity_tolerance:.0%})"
        )

    def __call__(self, step: int, record: dict[str, Any]) -> None:
        if "lm_loss" not in record or not self.cfg.check_every or step % self.cfg.check_every:
            return
        self.checks.append({"step": step, **self.measure()})
        self.reason = self.converged()
        if self.reason:
            raise Converged
        if self.detect_stalls:
            self.stalled = stall_reason(self.checks, self.cfg)
            if self.stalled:
                raise Stalled


@dataclass
class StageResult:
    """How one training stage went: steps, time, and when and why it stopped."""

    stage: str
    steps: int
    """Optimizer steps taken."""
    cap: int
    """The most steps it could take."""
    stopped: Literal["converged", "step cap", "stalled"]
    reason: str
    """What the criterion saw at the stop (or the last check, at the cap)."""
    seconds: float
    cpu_seconds: float
    """Process CPU time (all threads) of the stage, checks included."""
    tokens: int
    checks: list[dict[str, float]]
    """Every check: step and validation metrics."""
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    """The training records (metrics.jsonl)."""
    restarts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Earlier attempts of this stage that stalled and were restarted: attempt, seed, step,
    reason."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


def train_stage(stage: str, model: nn.Module, batches: FSMBatches, config: TrainConfig,
                out: Path, check: ConvergenceCheck | None, eval_batches: list[Tensor],
                ) -> StageResult:  # fmt: skip
    """``train`` until ``check`` says converged or ``config.steps`` are done."""
    t0, c0 = time.time(), time.process_time()
    trained = fit(model, batches, config, out, eval_batches=eval_batches,
                  callbacks=[check] if check is not None else [])  # fmt: skip
    history = trained.history
    stopped: Literal["converged", "step cap", "stalled"] = (
        "converged" if trained.result is None else "step cap"
    )
    if check is not None and check.stalled:
        stopped = "stalled"
    steps = max((int(r["step"]) for r in history), default=0)
    if stopped == "step cap":
        steps = config.steps
    reason = check.reason if check is not None else ""
    if stopped == "stalled":
        reason = check.stalled if check is not None else ""
    if stopped == "step cap":
        reason = "fixed length (no stop criterion)"
        if check is not None and check.checks:
            last = check.checks[-1]
            reason = (
                f"not converged; last check: transition accuracy {last['transition_accuracy']:.1%}"
            )
            if "fraction_pure" in last:
                reason += f", pure states {last['fraction_pure']:.0%}"
    return StageResult(
        stage=stage, steps=steps, cap=config.steps, stopped=stopped, reason=reason,
        seconds=time.time() - t0, cpu_seconds=time.process_time() - c0,
        tokens=steps * config.batch_size * config.grad_accum * batches.fsm.seq_len,
        checks=list(check.checks) if check is not None else [], history=history,
    )  # fmt: skip
