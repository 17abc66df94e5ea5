"""TokFSM steering: make a walk that ends in state ``a`` continue as if it ended in ``b``.

At the last token of ``a`` (every MLP output at once) the dictionary's latents are edited and
the activation becomes ``x + decode(z_edited) - decode(z)`` (the reconstruction error kept, as
``codes.saes.splice`` does): a sparse autoencoder or a neuron gets state ``b``'s best latent
added at its typical value (``value * W_dec[latent]``); a codebook is forced to ``b``'s best
code (its chosen codes replaced). Scored as the demo scores patching: a pair succeeds when at
least 80% of the model's top-E next states (E = out-degree) are successors of ``b``; the next
state's probability is the product of its digits' probabilities (exact, no sampling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from codebook_lens.codes.saes import CodebookDictionary, Dictionary, hook_site
from codebook_lens.experiments.fsm.data import TokFSM
from codebook_lens.model.codebook_model import HookSite, eval_mode


@dataclass
class Steer:
    """One layer's edit: the dictionary, its site, and per state the latent and its value."""

    dictionary: Dictionary
    site: HookSite
    latent: Tensor
    """``(N,)`` best latent per state."""
    value: Tensor
    """``(N,)`` that latent's mean activation where it fires for its state."""


@contextlib.contextmanager
def steered(model: nn.Module, steers: list[Steer], position: int, rows: Tensor) -> Iterator[None]:
    """Inside the block, the token at ``position`` of row ``r`` is steered to state
    ``rows[r]`` at every site of ``steers``."""
    with contextlib.ExitStack() as stack:
        for s in steers:

            def edit(x: Tensor, s: Steer = s) -> Tensor:
                at = x[:, position]  # (R, d)
                z = s.dictionary.encode(at)
                z_new = z.clone()
                lat = s.latent[rows]
                if isinstance(s.dictionary, CodebookDictionary):
                    z_new.zero_()
                    z_new[torch.arange(len(at)), lat] = s.value[rows].to(z.dtype)
                else:
                    z_new[torch.arange(len(at)), lat] += s.value[rows].to(z.dtype)
                out = x.clone()
                delta = s.dictionary.decode(z_new) - s.dictionary.decode(z)
                out[:, position] = at + delta.to(x.dtype)
                return out

            stack.enter_context(hook_site(model, s.site, edit))
        yield


@torch.no_grad()
def next_state_probs(model: nn.Module, fsm: TokFSM, prefixes: Tensor, steers: list[Steer],
                     targets: Tensor) -> Tensor:  # fmt: skip
    """``(B, N)`` next-state distribution after ``prefixes`` ``(B, L)``, their last token
    steered to ``targets`` ``(B,)`` (no steering when ``steers`` is empty)."""
    bsz, length = prefixes.shape
    logp = torch.zeros(bsz, fsm.num_states)
    for j in range(fsm.num_digits):
        heads, index = np.unique(fsm.digit_table[:, :j], axis=0, return_inverse=True)
        n_heads = heads.shape[0]
        tails = torch.from_numpy(heads).long()[None].expand(bsz, -1, -1)
        inputs = torch.cat([prefixes[:, None].expand(-1, n_heads, -1), tails], 2).flatten(0, 1)
        rows = targets.repeat_interleave(n_heads)
        with steered(model, steers, length - 1, rows):
            logits = model(input_ids=inputs).logits[:, -1]
        lp = torch.log_softmax(logits.float(), -1).unflatten(0, (bsz, n_heads))
        idx = torch.from_numpy(np.asarray(index).reshape(-1)).long()
        logp += lp[:, idx, torch.from_numpy(fsm.digit_table[:, j]).long()]
    return logp.exp()


def steering_pairs(fsm: TokFSM, n: int, prefix_states: int, seed: int) -> tuple[Tensor, ...]:
    """``n`` walks ``(P, L)`` of ``prefix_states`` states, their last states ``a`` and other
    states ``b`` to steer to (pairs with ``a == b`` dropped)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, states = fsm.sample_with_states(n, gen, 1 + prefix_states * fsm.num_digits)
    a = states[:, -1]
    b = torch.randint(fsm.num_states, (n,), generator=gen)
    keep = a != b
    return tokens[keep], a[keep], b[keep]


def steering_score(model: nn.Module, fsm: TokFSM, steers: list[Steer],
                   pairs: tuple[Tensor, ...], batch: int = 64) -> dict[str, float]:  # fmt: skip
    """Success rate (top-E next states >= 80% successors of ``b``) and the mean share of the
    top-E, and the probability mass, on ``b``'s successors."""
    tokens, _a, b = pairs
    adj = fsm.adjacency().float()
    with eval_mode(model):
        p = torch.cat([
            next_state_probs(model, fsm, tokens[i : i + batch], steers, b[i : i + batch])
            for i in range(0, len(b), batch)
        ])  # fmt: skip
    top = p.topk(fsm.num_edges, dim=-1).indices
    hit = adj[b.unsqueeze(1), top].mean(-1)
    return {
        "steer_success": float((hit >= 0.8).float().mean()),
        "steer_top_e_on_target": float(hit.mean()),
        "steer_mass_on_target": float((p * adj[b]).sum(-1).mean()),
    }
