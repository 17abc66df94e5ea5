"""The FSM demo's measurements: model metrics, code <-> state tables, neurons, targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from codebook_lens.experiments.fsm.config import DemoConfig
from codebook_lens.experiments.fsm.data import (
    TokFSM,
    first_transition_accuracy,
    next_token_metrics,
    sample_sequences,
    transition_stats,
)
from codebook_lens.model.codebook_model import CodebookModel, eval_mode
from codebook_lens.model.sites import MLP_NAMES, child, find_blocks


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
    """Best-F1 code per state from ``codes`` ``(P, k)`` and state ``labels`` ``(P,)``.

    Negative entries of ``codes`` (``-1``: fewer than ``k`` latents fired) count as no firing.
    """
    k = codes.shape[-1]
    flat_states = labels.reshape(-1, 1).expand(-1, k).reshape(-1).long()
    flat_codes = codes.reshape(-1).long()
    fired = flat_codes >= 0
    flat_states, flat_codes = flat_states[fired], flat_codes[fired]
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
        state_code_table(n, codes[n][:, ends].reshape(-1, cfg.codebooks.k), labels.reshape(-1), num_states, cfg.codebooks.num_codes)
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

    _, blocks = find_blocks(base)
    acts: list[Tensor] = [torch.empty(0)] * layers
    handles = []
    for i in range(layers):
        _, mlp = child(blocks[i], MLP_NAMES, "mlp")
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


# ------------------------------------------------------------------- targets
TARGETS: tuple[tuple[str, str], ...] = (
    ("codebook_transition_accuracy", "codebook transition accuracy >= 95%"),
    ("within_3_points", "codebook transition accuracy within 3 points of the base"),
    ("pure_states", ">= 80% of states with a pure MLP code"),
    ("codes_beat_neurons", "more states with a pure code than with a pure best neuron"),
    ("patching", "patching all codes along the transition >= 80% success"),
)
"""The demo's targets: key and description."""

REFERENCE = {
    "source": "https://huggingface.co/taufeeque/TokFSM_k1_codebook_model",
    "what": "TokFSM codebook model of the paper's code, k=1, codebooks on attention and MLP "
    "(its model card)",
    "transition_accuracy": 0.5634,
    "first_transition_accuracy": 0.88,
}
"""The reference implementation's published figures for its TokFSM k=1 codebook model."""


def check_targets(metrics: dict[str, Any]) -> dict[str, bool]:
    """Which of ``TARGETS`` a run's metrics meet (none for a run stopped at the gate)."""
    if "codebook" not in metrics:
        return {key: False for key, _ in TARGETS}
    base, cb = metrics["base"]["transition_accuracy"], metrics["codebook"]["transition_accuracy"]
    pure, neurons = metrics["state_codes"]["fraction_pure"], metrics["neurons"]["fraction_pure"]
    return {
        "codebook_transition_accuracy": cb >= 0.95,
        "within_3_points": base - cb <= 0.03,
        "pure_states": pure >= 0.8,
        "codes_beat_neurons": pure > neurons,
        "patching": metrics["interventions"]["all"]["success_rate"] >= 0.8,
    }


def claim_one_tables(
    model: CodebookModel, base: nn.Module, fsm: TokFSM, tokens: Tensor, states: Tensor,
    cfg: DemoConfig,
) -> tuple[list[StateCodeTable], list[dict[str, np.ndarray]]]:  # fmt: skip
    """Claim 1's evidence at the tokens that complete a state: a code <-> state table per MLP
    codebook of ``model``, and the best neuron per state of each MLP of ``base``."""
    ends, labels = state_positions(fsm, tokens, states)
    tables = mlp_state_tables(model, tokens, ends, labels, fsm.num_states, cfg)
    acts = mlp_neuron_activations(base, tokens, cfg.lm.num_layers)
    return tables, [neuron_table(a[:, ends], labels, fsm.num_states) for a in acts]
