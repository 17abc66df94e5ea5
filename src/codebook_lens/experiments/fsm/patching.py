"""The FSM demo's claim 2: patch the codes of one state into a sequence in another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from codebook_lens.experiments.fsm.config import DemoConfig, PatchScope
from codebook_lens.experiments.fsm.data import (
    TokFSM,
)
from codebook_lens.model.codebook_model import CodebookModel, eval_mode


# ------------------------------------------------------------- interventions
class RowPatch:
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


def patched_next_state_probs(
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
                            layers[name].edit = RowPatch(target, length - 1, 1)
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
    distributions. Two scopes (see ``patched_next_state_probs``): the headline ``transition``
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
            out, first = patched_next_state_probs(
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
