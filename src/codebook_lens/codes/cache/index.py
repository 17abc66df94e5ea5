"""The inverted index of a codebook's codes: key ``group * C + code`` -> sorted token positions.

Stored as CSR: ``index/<name>.indptr.npy`` and ``index/<name>.positions.npy`` (see ``format``).
With ``padded`` (SAE codebooks, one group) the unfired id ``num_codes`` is key ``num_codes``, one
past the last real key: it is counted nowhere and indexed nowhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_INDEX_CHUNK = 1 << 22  # (token, group, k) entries sorted at once while building an index


def count_codes(codes: np.ndarray, num_codes: int, *, padded: bool = False) -> np.ndarray:
    """``(groups * num_codes,)`` tokens on which each key ``g * C + c`` fires, for ``codes``
    ``(n, groups, k)``; read in chunks (bounded memory). ``padded``: ids ``num_codes``
    (unfired slots) are not counted."""
    n, groups, k = codes.shape
    n_keys = groups * num_codes
    _check_padded(groups, padded)
    offs = (np.arange(groups, dtype=np.int64) * num_codes)[None, :, None]
    rows = max(1, _INDEX_CHUNK // max(1, groups * k))
    counts = np.zeros(n_keys + padded, dtype=np.int64)
    for s in range(0, n, rows):
        counts += np.bincount((codes[s : s + rows] + offs).ravel(), minlength=n_keys + padded)
    return counts[:n_keys]


def _check_padded(groups: int, padded: bool) -> None:
    if padded and groups != 1:  # the unfired key would collide with the next group's first
        raise AssertionError(f"padded codes need one group, not {groups}")


def build_index(
    codes: np.ndarray,
    num_codes: int,
    indptr_path: Path,
    positions_path: Path,
    *,
    padded: bool = False,
) -> np.ndarray:
    """Inverted index of ``codes`` ``(n, groups, k)``: key ``g * num_codes + c`` -> positions.

    Two passes over chunks (count, then place with a stable sort), so memory stays bounded
    whatever ``n``; positions of each key come out sorted. Both files are written under
    temporary names and renamed, so either is complete or absent. Returns the counts.
    ``padded``: ids ``num_codes`` (unfired slots) are left out.
    """
    n, groups, k = codes.shape
    n_keys = groups * num_codes
    # Keys of at most 16 bits sort with numpy's radix sort (stable, linear time).
    key_dtype = np.uint16 if n_keys + padded <= 1 << 16 else np.int64
    offs = (np.arange(groups, dtype=np.int64) * num_codes)[None, :, None]
    rows = max(1, _INDEX_CHUNK // max(1, groups * k))
    counts = count_codes(codes, num_codes, padded=padded)
    indptr = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    pos_dtype = np.int32 if n < 2**31 else np.int64
    tmp_pos = positions_path.with_suffix(".tmp.npy")
    positions = np.lib.format.open_memmap(
        tmp_pos, mode="w+", dtype=pos_dtype, shape=(int(indptr[-1]),)
    )
    cursor = indptr[:-1].copy()
    for s in range(0, n, rows):
        chunk = codes[s : s + rows]
        keys = (chunk + offs).ravel().astype(key_dtype)
        pos = np.repeat(np.arange(s, s + len(chunk), dtype=pos_dtype), groups * k)
        if padded:  # unfired slots are not positions of any key
            fired = keys < n_keys
            keys, pos = keys[fired], pos[fired]
        order = np.argsort(keys, kind="stable")
        ks = keys[order].astype(np.int64)
        c = np.bincount(ks, minlength=n_keys)
        first = np.cumsum(c) - c  # where each key's run starts in ks
        dest = cursor[ks] + (np.arange(len(ks)) - first[ks])
        positions[dest] = pos[order]
        cursor += c
    positions.flush()
    del positions
    os.replace(tmp_pos, positions_path)
    tmp_ptr = indptr_path.with_suffix(".tmp.npy")
    np.save(tmp_ptr, indptr, allow_pickle=False)
    os.replace(tmp_ptr, indptr_path)
    return counts
