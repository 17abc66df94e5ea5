"""Counting code ids at token positions: the kernel under ``search``'s ranking.

A broad pattern covers a large part of the cache, so ranking counts billions of stored ids
(pattern tokens x heads x k). The kernel moves each token's ``k`` ids of one head as a single
fixed-size cell (a void item of ``k * itemsize`` bytes): one row gather (``np.take``) of the
pattern's tokens, one cell transpose into a per-head buffer, then one single-threaded
histogram per head over contiguous ids that fit in a small (L2-resident) count array.
Moving cells instead of single ids makes the gather and the transpose cost a fraction of a
nanosecond per id; the per-head histograms keep the counters in cache. It runs in the calling
process on one core; ``ranking`` shares codebooks and shards out over worker processes.
"""

from __future__ import annotations

import numpy as np
import torch

from codebook_lens.model.cpu_threads import one_cpu_thread

ROWS_ENTRIES = 1 << 22
"""Ids (rows x heads x k) moved per step: bounds the kernel's buffers (8 MB at 16-bit ids)."""

SMALL_ENTRIES = 1 << 16
"""Below this many ids (positions x heads x k) the plain per-head ``np.bincount`` is faster:
the kernel's fixed cost (thread switch, buffers, a histogram call per head) dominates."""

_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _histogram(ids: np.ndarray, minlength: int) -> torch.Tensor:
    """Counts of every id in the contiguous 1-D ``ids`` (non-negative), at least ``minlength``."""
    if ids.dtype == np.uint8:
        return torch.bincount(torch.from_numpy(ids), minlength=minlength)
    # torch's bincount reads narrow signed ids without widening them first (numpy's converts
    # every id to int64); the caller checked that every stored id fits the signed type.
    signed = ids.view(_SIGNED[ids.dtype.itemsize])
    return torch.bincount(torch.from_numpy(signed), minlength=minlength)


def count_codes(codes: np.ndarray, positions: np.ndarray, num_codes: int) -> np.ndarray:
    """``(groups, num_codes)`` int64: how often each id ``< num_codes`` is stored at ``positions``.

    ``codes``: ``(tokens, groups, k)`` unsigned ids (usually a memory map); ids ``>= num_codes``
    (an SAE codebook's unfired slots) are not counted. ``positions``: token indices, any order,
    repeats counted again.
    """
    n, groups, k = codes.shape
    out = np.zeros((groups, num_codes), dtype=np.int64)
    positions = np.asarray(positions, dtype=np.intp)
    if not len(positions) or not groups * k:
        return out
    top = num_codes  # the largest id stored: an unfired slot's
    bits = 8 * codes.dtype.itemsize
    fast = (
        len(positions) * groups * k >= SMALL_ENTRIES
        and codes.flags.c_contiguous
        and codes.dtype.kind == "u"
        and (codes.dtype.itemsize == 1 or top < 1 << (bits - 1))
    )
    if not fast:
        return count_codes_plain(codes, positions, num_codes)
    cell = np.dtype((np.void, codes.dtype.itemsize * k))
    cells = codes.reshape(n, groups * k).view(cell)  # (tokens, groups): one cell per head
    rows = max(1, min(len(positions), ROWS_ENTRIES // (groups * k)))
    by_head = np.empty((groups, rows), dtype=cell) if groups > 1 else None
    acc = torch.from_numpy(out)
    # One intra-op thread: torch's bincount on two threads is many times slower per id.
    with one_cpu_thread(torch.device("cpu")):
        for s in range(0, len(positions), rows):
            gathered = np.take(cells, positions[s : s + rows], axis=0)  # (m, groups) cells
            m = len(gathered)
            if by_head is None:
                heads = gathered.T
            else:
                np.copyto(by_head[:, :m], gathered.T)
                heads = by_head[:, :m]
            for g in range(groups):
                ids = heads[g].view(codes.dtype)  # (m * k,) contiguous
                acc[g] += _histogram(ids, num_codes)[:num_codes]
    return out


def count_codes_plain(codes: np.ndarray, positions: np.ndarray, num_codes: int) -> np.ndarray:
    """``count_codes`` by gathered rows and one ``np.bincount`` per head: for layouts the cell
    kernel does not take (non-contiguous arrays, ids past the signed range), and the baseline
    the benchmark compares it with."""
    groups, k = codes.shape[1:]
    out = np.zeros((groups, num_codes), dtype=np.int64)
    positions = np.asarray(positions, dtype=np.intp)
    rows = max(1, ROWS_ENTRIES // (groups * k))
    for s in range(0, len(positions), rows):
        sub = np.asarray(codes[positions[s : s + rows]])
        for g in range(groups):
            out[g] += np.bincount(sub[:, g].ravel(), minlength=num_codes)[:num_codes]
    return out
