"""Keep codebook state identical on every rank under ``torch.distributed`` (DDP / torchrun).

DDP averages gradients, so codebook *weights* stay in step on their own; what it does not cover
is the state codebook layers change outside autograd:

- usage counts: every rank counts only its own tokens, but the dead-code decision must use the
  global counts -> ``sync_usage`` sums them across ranks before each ``step()``;
- the buffer of recent inputs that dead codes are revived from -> ``sample_rows`` /
  ``all_gather_rows`` fill it with rows of the *global* batch, identically on every rank (and
  exactly as one process holding the whole batch would, RNG draws included);
- revival and k-means vectors -> chosen on rank 0 and broadcast (``broadcast_``), so ranks can
  never drift apart, even if their RNGs did.

Every function is a no-op (or the plain single-process operation) without an initialised
process group of more than one rank, so ``layer.py`` calls them unconditionally.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return rank_world()[1] > 1


def _sizes(n: int, device: torch.device) -> list[int]:
    import torch.distributed as dist

    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(rank_world()[1])]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


def total_rows(x: Tensor) -> int:
    """Rows of ``x`` summed over ranks (``x.shape[0]`` in one process)."""
    return sum(_sizes(x.shape[0], x.device)) if active() else x.shape[0]


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` (rows may differ in number) concatenated in rank order."""
    if not active():
        return x
    import torch.distributed as dist

    sizes = _sizes(x.shape[0], x.device)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def sample_rows(x: Tensor, count: int) -> Tensor:
    """``count`` rows drawn uniformly with replacement from all ranks' rows together.

    In one process this is ``x[torch.randint(0, n, (count,))]``. Distributed, every rank draws
    the same indices into the rank-ordered concatenation (the RNGs are in step), fills in the
    rows it holds and one all-reduce of ``count`` rows completes them: the result is identical on
    every rank and equal to the single-process draw from the global batch, without gathering
    the whole batch.
    """
    if not active():
        return x[torch.randint(0, x.shape[0], (count,), device=x.device)]
    import torch.distributed as dist

    rank, _ = rank_world()
    sizes = _sizes(x.shape[0], x.device)
    pick = torch.randint(0, sum(sizes), (count,), device=x.device)
    local = pick - sum(sizes[:rank])
    mine = (local >= 0) & (local < x.shape[0])
    out = x.new_zeros((count, *x.shape[1:]))
    out[mine] = x[local[mine]]
    dist.all_reduce(out)
    return out


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy."""
    if active():
        import torch.distributed as dist

        dist.broadcast(t, src)
    return t


def any_true(mask: Tensor) -> bool:
    """``bool(mask.any())`` (a host sync); only called where ranks must agree to communicate."""
    return bool(mask.any())


# Per-layer totals at the last synchronisation, to all-reduce only what is new since then.
_last_sync: weakref.WeakKeyDictionary[Any, tuple[float, float]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def sync_usage(layer: Any) -> None:
    """Sum ``usage`` (codes chosen since the last step) over ranks, and add the other ranks'
    share to ``counts`` / ``tokens_seen`` / ``mse_sum``, so the dead-code clock and the
    statistics are those of the global batch on every rank."""
    if not active():
        return
    import torch.distributed as dist

    local = layer.usage.clone()
    dist.all_reduce(layer.usage)
    layer.counts += layer.usage - local
    tokens0, mse0 = _last_sync.get(layer, (0.0, 0.0))
    delta = torch.stack(
        [
            layer.tokens_seen.double() - tokens0,
            layer.mse_sum.double() - mse0,
        ]
    )
    total = delta.clone()
    dist.all_reduce(total)
    layer.tokens_seen += (total[0] - delta[0]).round().long()
    layer.mse_sum += total[1] - delta[1]
    _last_sync[layer] = (float(layer.tokens_seen), float(layer.mse_sum))
