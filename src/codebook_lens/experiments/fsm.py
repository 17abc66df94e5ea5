"""The finite-state-machine demo (METHOD.md section 2): ``codebook-lens demo`` / ``make demo``.

1. Train a small causal transformer from scratch on TokFSM walks (the base model).
2. Fine-tune it with codebooks on every attention head and every MLP output (the codebook
   model; C=1000, k=1), starting from the base weights and k-means-initialised codebooks.
3. Measure both: next-token loss / accuracy, sampled transition accuracy, exact
   first-transition accuracy.
4. Claim 1: for each MLP codebook, the code <-> current-state table (precision, recall, F1 at the
   token that completes a state), against the best single MLP neuron of the base model.
5. Claim 2: patch the codes at the last position of a sequence in state ``a`` with those of a
   sequence in state ``b`` and check the next-state distribution moves to ``b``'s.
6. Write ``runs/fsm-<timestamp>/``: report.html/.md, metrics.json, fsm.json, configs, models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebook_lens.config import check_choice, write_json_atomic
from codebook_lens.experiments.fsm_data import (
    FSMConfig,
    TokFSM,
    first_transition_accuracy,
    next_token_metrics,
    sample_sequences,
    transition_stats,
)
from codebook_lens.model.codebook_model import CodebookModel, attach_codebooks, eval_mode
from codebook_lens.model.config import CodebookConfig
from codebook_lens.training.loop import TrainConfig, train

PatchGroup = Literal["none", "attn", "mlp", "all"]
PATCH_GROUPS: tuple[PatchGroup, ...] = ("none", "attn", "mlp", "all")
PatchScope = Literal["transition", "last"]


@dataclass
class DemoConfig:
    """Every setting of the FSM demo (the defaults reproduce the paper's setup on a CPU)."""

    num_states: int = 100
    """FSM states N."""
    num_edges: int = 10
    """Out-edges per state E."""
    base: int = 10
    """Digits base; states are written as zero-padded base-b digits, one token each."""
    seq_len: int = 65
    """Training sequence length in tokens including BOS (BOS + 32 two-digit states)."""
    fsm_seed: int = 0
    """Seed of the random machine."""

    arch: Literal["gpt2", "gpt_neox", "llama"] = "gpt2"
    """Hugging Face architecture of the transformer, built from a config."""
    layers: int = 2
    """Transformer blocks."""
    width: int = 64
    """Residual width (fewer dimensions than FSM states: the superposition regime)."""
    heads: int = 4
    """Attention heads."""
    mlp_width: int = 256
    """MLP hidden width."""
    rotary_fraction: float = 1.0
    """gpt_neox only: fraction of each head's dimensions with rotary positions (HF's and the
    reference's default is 0.25; full rotary learns the previous-token heads far sooner)."""
    rotary_scale: float = 1.0
    """gpt_neox and llama: every rotary frequency times this (HF's linear RoPE scaling, factor
    1/scale). Rotary positions are relative only; at pi the fastest frequency has a period of
    2 tokens, which lets attention tell a state's first digit from its second."""

    base_steps: int = 3000
    """Most optimizer steps for the base model (fewer once the stop criterion holds)."""
    base_lr: float = 3e-3
    """Peak learning rate of the base model."""
    batch_size: int = 32
    """Sequences per step (small batches: this task is limited by the number of updates)."""
    warmup_steps: int = 30
    """Linear warmup steps (both stages)."""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate decay after the warmup (both stages; over each stage's step cap). Constant:
    the stages stop on a criterion, not at the cap (measured: cosine over 1,500 steps gave no
    better base model than constant)."""

    num_codes: int = 1000
    """Codes per codebook C (per head for attention codebooks)."""
    k: int = 1
    """Codes per token (and head)."""
    codebook_steps: int = 1500
    """Most fine-tuning steps of the codebook model (initialised from the base model), warm-up
    included (fewer once the stop criterion holds)."""
    codebook_warmup_steps: int = 0
    """Train the codebooks only (model frozen, constant LR) for this many of the fine-tuning
    steps before joint training. Off by default: measured at seeds 0 and 1 it did not help
    (seed 0: 92% -> 80% pure states at the same accuracy; seed 1: 92.5% -> 91.6% transition
    accuracy), though one separate fine-tune of a longer-trained base gained from it."""
    codebook_lr: float = 0.1
    """Peak learning rate of the codebooks. High, so that codes keep up with the activations:
    from the same base, 600 steps reached 92% transition accuracy at 3e-3, 98% at 3e-2, and 0.1
    had 98% of states pure at 500 steps (93% at 3e-2)."""
    model_lr_factor: float = 0.01
    """The transformer's learning rate during fine-tuning, as a fraction of codebook_lr (1e-3 at
    the defaults; 3e-3 was slower and a factor 1.0 at codebook_lr 3e-3 diverged)."""
    commitment_weight: float = 1.0
    """Pulls each codebook's input toward its chosen code. Without it the straight-through
    gradient lets activations drift away from the codes and joint fine-tuning diverges."""
    layer_norm: bool = False
    """LayerNorm each codebook's input before choosing and reconstructing (the codes live on the
    normalised scale, so the transformer cannot inflate the quantisation error by growing its
    activations)."""
    dead_code_steps: int = 0
    """Revive codes unused for this many steps (0: never). Off by default here: every revival
    splits a state's activations between two near-identical codes, which destroys the
    one-code-per-state structure the demo measures (measured: 95% -> 35% pure states)."""

    check_every: int = 100
    """Every this many steps each stage measures itself on validation data (sequences that the
    report does not use) and stops once converged; 0: train to the step caps."""
    base_target: float = 0.97
    """The base stage stops once its validation transition accuracy reaches this (the codebook
    stage trains the transformer further, at a lower learning rate)."""
    codebook_gap: float = 0.01
    """The codebook stage stops once its validation transition accuracy is within this of the
    base model's (and its pure-state fraction is stable, see purity_tolerance)."""
    purity_tolerance: float = 0.02
    """Stable = the fraction of states with a pure MLP code moved by at most this since the
    previous check."""
    check_sequences: int = 64
    """Sequences sampled from BOS at each check (and validation sequences for purity: 2x)."""

    eval_sequences: int = 256
    """Held-out sequences for loss / accuracy and for the state-code tables."""
    transition_samples: int = 256
    """Sequences sampled from BOS for the transition accuracy."""
    intervention_pairs: int = 300
    """Random (a, b) state pairs for the patching experiment."""
    intervention_prefix_states: int = 8
    """States in each patched sequence (the patch is at its last token)."""
    purity_threshold: float = 0.9
    """Precision and recall a code (or neuron) needs to count as a pure state detector."""
    seed: int = 0
    """Seed of training, sampling and pair choice."""
    threads: int = 0
    """torch CPU threads; 0: 2, or 1 when the load average says the cores are busy (two threads
    that wait on each other on a busy machine were measured 10x slower per step than one)."""

    def __post_init__(self) -> None:
        FSMConfig(self.num_states, self.num_edges, self.base, self.seq_len, self.fsm_seed)
        check_choice("arch", self.arch, ("gpt2", "gpt_neox", "llama"))
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        for name in (
            "layers", "width", "heads", "mlp_width", "base_steps", "batch_size", "num_codes",
            "k", "codebook_steps", "eval_sequences", "transition_samples", "intervention_pairs",
            "intervention_prefix_states", "check_sequences",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        for name in ("check_every", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 0")
        for name in ("base_target", "codebook_gap", "purity_tolerance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; it must be in [0, 1]")
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is invalid for heads={self.heads}: it must divide evenly"
            )
        if not 0 <= self.codebook_warmup_steps < self.codebook_steps:
            raise ValueError(
                f"codebook_warmup_steps={self.codebook_warmup_steps} is invalid; it must be an "
                f"integer in [0, codebook_steps={self.codebook_steps})"
            )
        if self.k > self.num_codes:
            raise ValueError(f"k={self.k} is invalid; it must be <= num_codes={self.num_codes}")
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if not 0 < self.rotary_scale <= 4:
            raise ValueError(f"rotary_scale={self.rotary_scale} must be in (0, 4]")
        if not 0 < self.purity_threshold <= 1:
            raise ValueError(f"purity_threshold={self.purity_threshold} must be in (0, 1]")
        self.codebook_config()  # checks commitment_weight, dead_code_steps, ... up front

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A tiny run for tests and smoke checks (about a minute on 2 cores)."""
        values: dict[str, Any] = dict(
            num_states=12, num_edges=3, seq_len=33, layers=2, width=64, heads=4, mlp_width=128,
            base_steps=40, batch_size=32, warmup_steps=5, num_codes=64, codebook_steps=30,
            eval_sequences=48, transition_samples=24, intervention_pairs=24,
            intervention_prefix_states=4, dead_code_steps=10, codebook_warmup_steps=10,
            check_every=20, check_sequences=16,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def fsm_config(self) -> FSMConfig:
        return FSMConfig(self.num_states, self.num_edges, self.base, self.seq_len, self.fsm_seed)

    def codebook_config(self) -> CodebookConfig:
        return CodebookConfig(
            num_codes=self.num_codes,
            k=self.k,
            placements=["attn_heads", "mlp_out"],
            kmeans_init=True,
            commitment_weight=self.commitment_weight,
            layer_norm=self.layer_norm,
            dead_code_steps=self.dead_code_steps,
            seed=self.seed,
        )


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


def build_base_model(cfg: DemoConfig, fsm: TokFSM) -> nn.Module:
    """A randomly initialised HF causal LM sized by ``cfg`` for the FSM vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    common: dict[str, Any] = dict(
        vocab_size=fsm.vocab_size, bos_token_id=fsm.bos_id, eos_token_id=fsm.eos_id
    )
    ctx = max(cfg.seq_len, 2 * cfg.intervention_prefix_states + 3)
    config: Any
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if cfg.rotary_scale != 1.0:
        rope = {**rope, "rope_type": "linear", "factor": 1.0 / cfg.rotary_scale}
    if cfg.arch == "gpt2":
        config = GPT2Config(
            n_layer=cfg.layers, n_embd=cfg.width, n_head=cfg.heads, n_inner=cfg.mlp_width,
            n_positions=ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
    elif cfg.arch == "gpt_neox":
        config = GPTNeoXConfig(
            num_hidden_layers=cfg.layers, hidden_size=cfg.width, num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_width, max_position_embeddings=ctx,
            rope_parameters={**rope, "partial_rotary_factor": cfg.rotary_fraction}, **common,
        )  # fmt: skip
    else:
        config = LlamaConfig(
            num_hidden_layers=cfg.layers, hidden_size=cfg.width, num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_width, max_position_embeddings=ctx, rope_parameters=rope,
            **common,
        )  # fmt: skip
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def resolve_threads(requested: int) -> int:
    """``requested`` torch threads if > 0; for 0, 2 on a quiet machine and 1 on a busy one.

    Two threads that must meet at every op lose their core to other processes in turn; on the
    2-core machine at load 10 a base-model step took 1.12 CPU s with 2 threads, 0.10 s with 1.
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        load = 0.0
    return 2 if cores >= 2 and load <= cores - 1.5 else 1


class _Converged(Exception):
    """Raised by a ``ConvergenceCheck`` inside ``train`` to end its stage early."""


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
                 reference: float | None = None) -> None:  # fmt: skip
        self.model, self.fsm, self.cfg, self.val = model, fsm, cfg, val
        self.reference = reference
        self.checks: list[dict[str, float]] = []
        self.reason = ""

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
            raise _Converged


@dataclass
class StageResult:
    """How one training stage went: steps, time, and when and why it stopped."""

    stage: str
    steps: int
    """Optimizer steps taken."""
    cap: int
    """The most steps it could take."""
    stopped: Literal["converged", "step cap"]
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

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "history"}


def train_stage(stage: str, model: nn.Module, batches: FSMBatches, config: TrainConfig,
                out: Path, check: ConvergenceCheck | None, eval_batches: list[Tensor],
                ) -> StageResult:  # fmt: skip
    """``train`` until ``check`` says converged or ``config.steps`` are done."""
    history: list[dict[str, Any]] = []
    callbacks = [lambda step, rec: history.append(rec)]
    if check is not None:
        callbacks.append(check)
    t0, c0 = time.time(), time.process_time()
    stopped: Literal["converged", "step cap"] = "step cap"
    try:
        train(model, batches, config, out, eval_batches=eval_batches, callbacks=callbacks)
    except _Converged:
        stopped = "converged"
    steps = max((int(r["step"]) for r in history), default=0)
    if stopped == "step cap":
        steps = config.steps
    reason = check.reason if check is not None else ""
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


# ------------------------------------------------------------------ metrics
def model_metrics(
    model: nn.Module, fsm: TokFSM, eval_tokens: Tensor, cfg: DemoConfig
) -> dict[str, float]:
    """Loss, accuracy, sampled transition accuracy and exact first-transition accuracy."""
    tok = next_token_metrics(model, eval_tokens, fsm)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    samples = sample_sequences(model, fsm, cfg.transition_samples, gen, cfg.seq_len)
    trans = transition_stats(fsm, samples)
    return {
        "loss": tok["loss"],
        "accuracy": tok["accuracy"],
        "optimal_loss": tok.get("optimal_loss", float("nan")),
        "optimal_accuracy": tok.get("optimal_accuracy", float("nan")),
        "transition_accuracy": trans["transition_accuracy"],
        "valid_state_fraction": trans["valid_state_fraction"],
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
    }


@dataclass
class StateCodeTable:
    """For one codebook: the best code for each state ("the current state is s")."""

    codebook: str
    code: np.ndarray
    """``(N,)`` best code per state."""
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    counts: np.ndarray
    """``(N, C)`` how often each code fired at the end of each state."""

    def fraction_pure(self, threshold: float) -> float:
        return float(((self.precision >= threshold) & (self.recall >= threshold)).mean())


def state_positions(fsm: TokFSM, tokens: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
    """Positions that complete a state and the state there: ``(P,)`` each (row-major)."""
    ends = fsm.state_end_positions(tokens.shape[1])  # (S,)
    labels = states[:, : ends.numel()]  # (B, S)
    return ends, labels


def state_code_table(
    name: str, codes: Tensor, labels: Tensor, num_states: int, num_codes: int
) -> StateCodeTable:
    """Best-F1 code per state from ``codes`` ``(P, k)`` and state ``labels`` ``(P,)``."""
    k = codes.shape[-1]
    flat_states = labels.reshape(-1, 1).expand(-1, k).reshape(-1).long()
    flat_codes = codes.reshape(-1).long()
    counts = torch.zeros(num_states * num_codes, dtype=torch.float64)
    counts.index_add_(
        0, flat_states * num_codes + flat_codes, torch.ones_like(flat_codes, dtype=torch.float64)
    )
    counts = counts.view(num_states, num_codes)
    n_state = torch.bincount(labels.reshape(-1).long(), minlength=num_states).double()  # tokens
    n_code = counts.sum(0)  # firings
    precision = counts / n_code.clamp_min(1)
    recall = counts / n_state.clamp_min(1).unsqueeze(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = f1.argmax(1)
    rows = torch.arange(num_states)
    return StateCodeTable(
        codebook=name,
        code=best.numpy(),
        precision=precision[rows, best].numpy(),
        recall=recall[rows, best].numpy(),
        f1=f1[rows, best].numpy(),
        counts=counts.numpy(),
    )


def mlp_state_tables(model: CodebookModel, tokens: Tensor, ends: Tensor, labels: Tensor,
                     num_states: int, cfg: DemoConfig) -> list[StateCodeTable]:  # fmt: skip
    """One ``StateCodeTable`` per MLP codebook, from the codes at the positions ``ends``."""
    codes = model.get_codes(tokens)
    return [
        state_code_table(n, codes[n][:, ends].reshape(-1, cfg.k), labels.reshape(-1), num_states, cfg.num_codes)
        for n in model.codebooks
        if n.endswith("mlp_out")
    ]  # fmt: skip


def pure_states(tables: Sequence[StateCodeTable], threshold: float) -> np.ndarray:
    """``(N,)`` bool: states with a pure code (precision and recall >= threshold) in any table."""
    pure = np.zeros(len(tables[0].code), dtype=bool)
    for t in tables:
        pure |= (t.precision >= threshold) & (t.recall >= threshold)
    return pure


@torch.no_grad()
def mlp_neuron_activations(base: nn.Module, tokens: Tensor, layers: int) -> list[Tensor]:
    """Hidden MLP neurons (after the nonlinearity) of every block: ``[(B, L, mlp_width)]``."""
    from codebook_lens.model.sites import MLP_NAMES as _MLP_NAMES
    from codebook_lens.model.sites import child as _child
    from codebook_lens.model.sites import find_blocks

    _, blocks = find_blocks(base)
    acts: list[Tensor] = [torch.empty(0)] * layers
    handles = []
    for i in range(layers):
        _, mlp = _child(blocks[i], _MLP_NAMES, "mlp")
        # The last Linear/Conv1D of the MLP reads the hidden neurons as its input.
        out_proj = [m for m in mlp.modules() if m is not mlp and hasattr(m, "weight")][-1]

        def grab(mod: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            acts[i] = args[0].detach()

        handles.append(out_proj.register_forward_pre_hook(grab))
    try:
        with eval_mode(base):
            base(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return acts


def neuron_table(acts: Tensor, labels: Tensor, num_states: int) -> dict[str, np.ndarray]:
    """Best single neuron (and threshold) per state, by F1: arrays of precision/recall/f1."""
    from codebook_lens.codes.analysis import best_neurons

    a = acts.reshape(-1, acts.shape[-1]).double().numpy()
    lab = labels.reshape(-1).numpy()
    out = {k: np.zeros(num_states) for k in ("precision", "recall", "f1", "neuron")}
    present = [s for s in range(num_states) if (lab == s).any()]
    for s, r in zip(present, best_neurons(a, [lab == s for s in present]), strict=True):
        out["precision"][s], out["recall"][s], out["f1"][s] = r.precision, r.recall, r.f1
        out["neuron"][s] = r.neuron
    return out


# ------------------------------------------------------------- interventions
class _RowPatch:
    """A ``CodeEdit`` that sets the codes at consecutive positions of every row to per-row targets.

    ``targets`` is ``(B, G, k)`` for one position or ``(B, P, G, k)`` for ``P`` positions starting
    at ``position``; each target row serves ``rows_per_target`` consecutive batch rows.
    """

    def __init__(self, targets: Tensor, position: int, rows_per_target: int) -> None:
        self.targets = targets if targets.dim() == 4 else targets.unsqueeze(1)  # (B, P, G, k)
        self.position = position
        self.rows_per_target = rows_per_target

    def edit_scores(self, scores: Tensor, rows: slice, lead_shape: tuple[int, ...]) -> Tensor:
        return scores

    def edit_codes(self, codes: Tensor, lead_shape: tuple[int, ...]) -> tuple[Tensor, None]:
        bsz, length = lead_shape
        view = codes.view(bsz, length, -1, codes.shape[-1]).clone()  # (B, L, G, k)
        targets = self.targets.repeat_interleave(self.rows_per_target, dim=0)[:bsz]
        span = targets.shape[1]
        view[:, self.position : self.position + span] = targets.to(view.device)
        return view.view_as(codes), None


def _codes_4d(codes: Tensor) -> Tensor:
    """Recorded codes as ``(B, L, G, k)`` (ungrouped codebooks have ``G = 1``)."""
    return codes if codes.dim() == 4 else codes.unsqueeze(2)


def _patched_next_state_probs(
    model: CodebookModel,
    fsm: TokFSM,
    prefixes: Tensor,
    sources: Tensor,
    groups: dict[str, list[str]],
    scopes: Sequence[PatchScope],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Next-state distributions of ``prefixes`` ``(B, L)`` with codes taken from ``sources``.

    For each group of codebooks, the codes at the last prefix position are replaced by those
    ``sources`` (sequences ending in other states) produce there; with ``scope="transition"``
    also the codes at every position of the next state written so far, taken from the source
    sequence continued with the same digits. The probability of a next state is the product of
    its digit probabilities (exact, no sampling). Returns scope -> group -> ``(B, N)``
    next-state probabilities, and group -> ``(B, V)`` next-token probabilities at the last
    prefix position (the same for every scope: there both patch one position).
    """
    bsz, length = prefixes.shape
    logp = {sc: {g: torch.zeros(bsz, fsm.num_states) for g in groups} for sc in scopes}
    first: dict[str, Tensor] = {}
    for j in range(fsm.num_digits):
        heads, index = np.unique(fsm.digit_table[:, :j], axis=0, return_inverse=True)
        n_heads = heads.shape[0]
        tails = torch.from_numpy(heads).long()[None].expand(bsz, -1, -1)

        def extend(x: Tensor, tails: Tensor = tails, n_heads: int = n_heads) -> Tensor:
            # (B * H, L + j); row r belongs to prefix r // H
            return torch.cat([x[:, None, :].expand(-1, n_heads, -1), tails], dim=2).flatten(0, 1)

        inputs = extend(prefixes)
        src = model.get_codes(extend(sources)) if any(groups.values()) else {}
        idx = torch.from_numpy(np.asarray(index).reshape(-1)).long()
        digit = torch.from_numpy(fsm.digit_table[:, j]).long()
        runs: dict[tuple[str, int], Tensor] = {}  # (group, patched span) -> log-probs
        for scope in scopes:
            for group, names in groups.items():
                # Scopes that patch the same span (all at j = 0; "none" always) share one pass.
                span = 0 if not names else 1 if scope == "last" else 1 + j
                if (group, span) not in runs:
                    layers = model.codebooks
                    try:
                        for name in names:
                            target = _codes_4d(src[name])[:, length - 1 : length - 1 + span]
                            layers[name].edit = _RowPatch(target, length - 1, 1)
                        logits = model(input_ids=inputs).logits[:, -1]
                    finally:
                        for name in names:
                            layers[name].edit = None
                    lp = torch.log_softmax(logits.float(), dim=-1).unflatten(0, (bsz, n_heads))
                    runs[group, span] = lp
                    if j == 0:
                        first[group] = lp[:, 0].exp()
                logp[scope][group] += runs[group, span][:, idx, digit]
    return {sc: {g: v.exp() for g, v in lp_sc.items()} for sc, lp_sc in logp.items()}, first


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between rows of ``p`` and ``q`` (renormalised)."""
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def intervention_experiment(
    model: CodebookModel, fsm: TokFSM, cfg: DemoConfig, batch: int = 64
) -> dict[str, Any]:
    """Patch the codes of state-``a`` sequences with those state-``b`` sequences produce.

    Success for a pair: at least 80% of the model's top-E next states are successors of ``b``
    (E = out-degree). Also reports the JS divergence to ``b``'s and ``a``'s true next-state
    distributions. Two scopes (see ``_patched_next_state_probs``): the headline ``transition``
    (last position of the state and the positions of the next state as it is written) and
    ``last`` (the last position only), reported under ``last_position``.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    m = cfg.intervention_prefix_states
    length = 1 + m * fsm.num_digits
    n = cfg.intervention_pairs
    tok_a, st_a = fsm.sample_with_states(n, gen, length)
    tok_b, st_b = fsm.sample_with_states(n, gen, length)
    a, b = st_a[:, -1], st_b[:, -1]
    keep = a != b  # a pair of equal states says nothing
    tok_a, tok_b, a, b = tok_a[keep], tok_b[keep], a[keep], b[keep]
    adj = fsm.adjacency().float()
    attn = [n for n in model.codebooks if n.endswith("attn_heads")]
    mlp = [n for n in model.codebooks if n.endswith("mlp_out")]
    groups = {"none": [], "attn": attn, "mlp": mlp, "all": attn + mlp}

    # The true distribution of the next token (the next state's first digit) after each state.
    first_digit = (adj / adj.sum(-1, keepdim=True)) @ F.one_hot(
        torch.from_numpy(fsm.digit_table[:, 0]).long(), fsm.vocab_size
    ).float()

    def score(p: Tensor, p_first: Tensor) -> dict[str, float]:
        tv_b = 0.5 * (p_first - first_digit[b]).abs().sum(-1)
        tv_a = 0.5 * (p_first - first_digit[a]).abs().sum(-1)
        top = p.topk(fsm.num_edges, dim=-1).indices
        hit_b = adj[b.unsqueeze(1), top].mean(-1)  # share of top-E that are b's successors
        hit_a = adj[a.unsqueeze(1), top].mean(-1)
        return {
            "success_rate": float((hit_b >= 0.8).float().mean()),
            "top_e_on_target": float(hit_b.mean()),
            "top_e_on_source": float(hit_a.mean()),
            "js_to_target": float(js_divergence(p, adj[b]).mean()),
            "js_to_source": float(js_divergence(p, adj[a]).mean()),
            "mass_on_target_successors": float((p * adj[b]).sum(-1).mean()),
            "next_token_tv_to_target": float(tv_b.mean()),
            "next_token_tv_to_source": float(tv_a.mean()),
        }

    results: dict[str, Any] = {}
    with eval_mode(model), torch.no_grad():
        scopes: tuple[PatchScope, ...] = ("transition", "last")
        probs: dict[str, dict[str, list[Tensor]]] = {sc: {g: [] for g in groups} for sc in scopes}
        firsts: dict[str, list[Tensor]] = {g: [] for g in groups}
        for s in range(0, len(b), batch):
            out, first = _patched_next_state_probs(
                model, fsm, tok_a[s : s + batch], tok_b[s : s + batch], groups, scopes
            )
            for g in groups:
                firsts[g].append(first[g])
                for sc in scopes:
                    probs[sc][g].append(out[sc][g])
        p_first = {g: torch.cat(v) for g, v in firsts.items()}
        scored = {
            sc: {g: score(torch.cat(probs[sc][g]), p_first[g]) for g in groups} for sc in scopes
        }
        results.update(scored["transition"])
        results["last_position"] = scored["last"]
    results["pairs"] = int(len(b))
    results["criterion"] = "top-E next states at least 80% successors of the target state b"
    results["scope"] = (
        "codes at the last position of state a and at each position of the next state as it "
        "is written, replaced by those the b sequence produces there (same digits written); "
        "last_position: the last position only"
    )
    return results


# ------------------------------------------------------------------- targets
TARGETS: tuple[tuple[str, str], ...] = (
    ("codebook_transition_accuracy", "codebook transition accuracy >= 95%"),
    ("within_3_points", "codebook transition accuracy within 3 points of the base"),
    ("pure_states", ">= 80% of states with a pure MLP code"),
    ("codes_beat_neurons", "more states with a pure code than with a pure best neuron"),
    ("patching", "patching all codes along the transition >= 80% success"),
)
"""The demo's targets (issue 15): key and description."""

REFERENCE = {
    "source": "https://huggingface.co/taufeeque/TokFSM_k1_codebook_model",
    "what": "TokFSM codebook model of the paper's code, k=1, codebooks on attention and MLP "
    "(its model card)",
    "transition_accuracy": 0.5634,
    "first_transition_accuracy": 0.88,
}
"""The reference implementation's published figures for its TokFSM k=1 codebook model."""


def check_targets(metrics: dict[str, Any]) -> dict[str, bool]:
    """Which of ``TARGETS`` a run's metrics meet."""
    base, cb = metrics["base"]["transition_accuracy"], metrics["codebook"]["transition_accuracy"]
    pure, neurons = metrics["state_codes"]["fraction_pure"], metrics["neurons"]["fraction_pure"]
    return {
        "codebook_transition_accuracy": cb >= 0.95,
        "within_3_points": base - cb <= 0.03,
        "pure_states": pure >= 0.8,
        "codes_beat_neurons": pure > neurons,
        "patching": metrics["interventions"]["all"]["success_rate"] >= 0.8,
    }


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


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


def write_report(out: Path, cfg: DemoConfig, metrics: dict[str, Any], base_hist: list[dict[str, Any]],
                 cb_hist: list[dict[str, Any]], tables: list[StateCodeTable], neurons: list[dict[str, np.ndarray]],
                 floor: float) -> Path:  # fmt: skip
    from codebook_lens.report import Report

    rep = Report("Codebook features on a finite state machine")
    rep.paragraph(
        f"TokFSM with N={cfg.num_states} states and E={cfg.num_edges} out-edges, states written "
        f"as base-{cfg.base} digits. Transformer: {cfg.arch}, {cfg.layers} layers, width "
        f"{cfg.width}, {cfg.heads} heads, MLP {cfg.mlp_width}. Codebooks on every attention head "
        f"and every MLP output, C={cfg.num_codes}, k={cfg.k}. Seeds: training {cfg.seed}, "
        f"machine {cfg.fsm_seed}. Wall time {metrics['wall_seconds']:.0f} s, CPU time "
        f"{metrics['cpu_seconds']:.0f} s, {metrics['threads']} torch thread(s), load average "
        f"{metrics['load_average']['start']:.1f} at the start."
    )
    rep.heading("Targets")
    rep.table(
        [{"target": text, "met": metrics["targets"][key]} for key, text in TARGETS],
        caption="The demo's targets at this seed",
    )
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


# ---------------------------------------------------------------------- run
def run_demo(
    cfg: DemoConfig, out_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Run the whole demo; returns ``metrics`` (also written to ``<out>/metrics.json``).

    Everything is written into a temporary folder first and renamed at the end, so a crashed
    or interrupted run leaves no half-written report behind.
    """
    t0 = time.time()
    torch.set_num_threads(resolve_threads(cfg.threads))
    out = (
        Path(out_dir) if out_dir is not None else Path("runs") / time.strftime("fsm-%Y%m%d-%H%M%S")
    )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r} already exists and is not empty; choose a new folder")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
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


def _run(cfg: DemoConfig, out: Path, t0: float, progress: bool) -> dict[str, Any]:
    c0, load0 = time.process_time(), _load_average()
    fsm = TokFSM(cfg.fsm_config())
    write_json_atomic(out / "fsm.json", fsm.to_json())
    write_json_atomic(out / "demo_config.json", dataclasses.asdict(cfg))
    eval_tokens, eval_states = fsm.sample_with_states(
        cfg.eval_sequences, torch.Generator().manual_seed(cfg.seed + 1)
    )
    eval_batches = [eval_tokens[i : i + 64] for i in range(0, min(len(eval_tokens), 256), 64)]
    val = Validation.make(fsm, cfg)

    # 1. base model, from scratch
    _log("training the base model", progress)
    base = build_base_model(cfg, fsm)
    log_every = math.gcd(cfg.check_every, 25) if cfg.check_every else max(1, cfg.base_steps // 60)
    base_cfg = TrainConfig(
        steps=cfg.base_steps, batch_size=cfg.batch_size, lr=cfg.base_lr, model_lr_factor=1.0,
        weight_decay=0.0, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
        min_lr_ratio=0.05, eval_every=0, checkpoint_every=0, log_every=log_every, seed=cfg.seed,
        device="cpu", progress=progress, beta2=0.99,
    )  # fmt: skip
    check = ConvergenceCheck(base, fsm, cfg, val) if cfg.check_every else None
    base_res = train_stage("base", base, FSMBatches(fsm, cfg.batch_size, cfg.seed), base_cfg,
                           out / "base_training", check, eval_batches)  # fmt: skip
    base.save_pretrained(out / "base_model")  # type: ignore[operator]
    _log(f"base model: {base_res.steps} steps in {base_res.seconds:.0f} s ({base_res.stopped}: "
         f"{base_res.reason}); evaluating", progress)  # fmt: skip
    base_metrics = model_metrics(base, fsm, eval_tokens, cfg)
    if check is not None and not check.checks:  # stopped before its first check
        check.checks.append({"step": base_res.steps, **check.measure()})
    reference = check.checks[-1]["transition_accuracy"] if check is not None else None

    # 2. codebook model, fine-tuned from the base (a copy, so the base stays for comparison)
    _log("fine-tuning the codebook model", progress)
    cb_base = build_base_model(cfg, fsm)
    cb_base.load_state_dict(base.state_dict())
    model = attach_codebooks(cb_base, cfg.codebook_config())
    warm = cfg.codebook_warmup_steps
    cb_cfg = dataclasses.replace(
        base_cfg, steps=cfg.codebook_steps - warm, lr=cfg.codebook_lr,
        model_lr_factor=cfg.model_lr_factor, seed=cfg.seed + 1,
    )  # fmt: skip
    stages = [base_res]
    if warm:
        warm_cfg = dataclasses.replace(cb_cfg, steps=warm, model_lr_factor=0.0, schedule="constant",
                                       seed=cfg.seed + 2)  # fmt: skip
        stages.append(train_stage("codebook warm-up", model, FSMBatches(fsm, cfg.batch_size, cfg.seed + 2),
                                  warm_cfg, out / "codebook_warmup", None, eval_batches))  # fmt: skip
    cb_check = ConvergenceCheck(model, fsm, cfg, val, reference) if cfg.check_every else None
    cb_res = train_stage("codebook", model, FSMBatches(fsm, cfg.batch_size, cfg.seed + 1), cb_cfg,
                         out / "codebook_training", cb_check, eval_batches)  # fmt: skip
    stages.append(cb_res)
    model.save_pretrained(out / "codebook_model")
    _log(f"codebook model: {cb_res.steps} steps in {cb_res.seconds:.0f} s ({cb_res.stopped}: "
         f"{cb_res.reason}); evaluating", progress)  # fmt: skip
    model.eval()
    cb_metrics = model_metrics(model, fsm, eval_tokens, cfg)

    # 3. claim 1: state codes vs neurons, at the tokens that complete a state
    _log("state codes and neuron baseline", progress)
    ends, labels = state_positions(fsm, eval_tokens, eval_states)
    tables = mlp_state_tables(model, eval_tokens, ends, labels, fsm.num_states, cfg)
    acts = mlp_neuron_activations(base, eval_tokens, cfg.layers)
    neurons = [neuron_table(a[:, ends], labels, fsm.num_states) for a in acts]
    th = cfg.purity_threshold
    pure_code = pure_states(tables, th)
    pure_neuron = np.zeros(fsm.num_states, dtype=bool)
    for n in neurons:
        pure_neuron |= (n["precision"] >= th) & (n["recall"] >= th)

    # 4. claim 2: interventions
    _log("interventions", progress)
    inter = intervention_experiment(model, fsm, cfg)

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
    state_rows = []
    for s in range(fsm.num_states):
        best = max(tables, key=lambda t: t.f1[s])
        state_rows.append(
            {"state": s, "codebook": best.codebook, "code": int(best.code[s]),
             "precision": float(best.precision[s]), "recall": float(best.recall[s])}
        )  # fmt: skip
    write_json_atomic(out / "state_codes.json", state_rows)
    metrics["targets"] = check_targets(metrics)
    cb_hist, offset = [], 0
    for st in stages[1:]:
        cb_hist += [{**r, "step": r["step"] + offset} for r in st.history]
        offset += st.steps
    for _ in range(2):  # the report shows the times; the second pass includes writing it
        metrics["wall_seconds"] = time.time() - t0
        metrics["cpu_seconds"] = time.process_time() - c0
        metrics["load_average"] = {"start": load0, "end": _load_average()}
        write_report(out, cfg, metrics, base_res.history, cb_hist, tables, neurons, fsm.floor_loss)
    write_json_atomic(out / "metrics.json", _with_flat_keys(metrics))
    return metrics


def _with_flat_keys(metrics: dict[str, Any]) -> dict[str, Any]:
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
    b, c, i = metrics["base"], metrics["codebook"], metrics["interventions"]
    lines = [
        f"wall time: {metrics['wall_seconds']:.0f} s (CPU {metrics['cpu_seconds']:.0f} s, "
        f"{metrics['threads']} thread(s), load average {metrics['load_average']['start']:.1f})",
        *(
            f"{st['stage']}: {st['steps']} steps, {st['stopped']} ({st['reason']})"
            for st in metrics["stages"].values()
        ),
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


def _metric(metrics: dict[str, Any], key: str) -> float:
    if key == "gap":
        return float(
            metrics["base"]["transition_accuracy"] - metrics["codebook"]["transition_accuracy"]
        )
    value: Any = metrics
    for part in key.split("."):
        value = value[part]
    return float(value)


def _finished_run(folder: Path, cfg: DemoConfig) -> dict[str, Any] | None:
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
        if folder.exists() and any(folder.iterdir()) and _finished_run(folder, c) is None:
            raise ValueError(
                f"out={str(out)!r} holds {folder.name}/, which is not a finished run of these "
                "settings; choose a new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, Any]] = {}
    for s, c in configs.items():
        folder = out / f"seed-{s}"
        done = _finished_run(folder, c)
        if done is not None:
            _log(f"seed {s}: reusing the finished run in {folder}", progress)
            runs[s] = done
            continue
        _log(f"seed {s} ({len(runs) + 1}/{len(configs)})", progress)
        runs[s] = run_demo(c, folder, progress=progress)
    from codebook_lens.report import write_bytes_atomic

    summary_data = summarize_seeds(runs)
    write_json_atomic(out / "summary.json", summary_data)
    rep = seeds_report(cfg, summary_data)
    write_bytes_atomic(out / "summary.md", rep.to_markdown().encode("utf-8"))
    write_bytes_atomic(out / "summary.html", rep.to_html().encode("utf-8"))
    summary_data["report"] = str(out / "summary.html")
    return summary_data


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
        row["threads"] = m.get("threads")
        row["load_average"] = m.get("load_average")
        rows.append(row)
    agg = {}
    for key, _, worst in SUMMARY_METRICS:
        values = [r[key] for r in rows]
        agg[key] = {
            "mean": float(np.mean(values)),
            "worst": float(min(values) if worst == "min" else max(values)),
            "worst_seed": rows[int(np.argmin(values) if worst == "min" else np.argmax(values))][
                "seed"
            ],
        }
    held = {key: sum(r["targets"][key] for r in rows) for key, _ in TARGETS}
    return {
        "seeds": [r["seed"] for r in rows],
        "per_seed": rows,
        "aggregate": agg,
        "targets_held": held,
        "all_targets_held": sum(all(r["targets"].values()) for r in rows),
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
        f"report. Model: {cfg.arch}, {cfg.layers} layers, width {cfg.width}, MLP "
        f"{cfg.mlp_width}; caps {cfg.base_steps} + {cfg.codebook_steps} steps."
    )
    rep.heading("Targets")
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
        table.append(row)
    for stat in ("mean", "worst"):
        row = {"seed": stat}
        row.update({label: data["aggregate"][key][stat] for key, label, _ in SUMMARY_METRICS})
        table.append(row)
    rep.table(
        table,
        columns=["seed", *cols, "targets met"],
        caption="TA = sampled transition accuracy; worst = the lowest (highest for the gap, the "
        "neurons, the steps and the times) over the seeds",
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
    for key, text in TARGETS:
        lines.append(f"{text}: held at {data['targets_held'][key]}/{n} seeds")
    lines.append(f"all targets: {data['all_targets_held']}/{n} seeds")
    if "report" in data:
        lines.append(f"report: {data['report']}")
    return "\n".join(lines)
