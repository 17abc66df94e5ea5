"""Shards: one cache written as contiguous slices by several processes, read as one.

Shard ``i`` of ``n`` is a complete cache in ``<cache>/shard-0000i-of-0000n/``; the top-level
``manifest.json`` lists the shards (``shard_manifest``), and ``ShardedArray`` reads their
arrays in one global order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codebook_lens.codes.cache.files import file_digest
from codebook_lens.codes.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    partial_path,
    read_manifest,
)


def shard_name(i: int, n: int) -> str:
    """Folder of shard ``i`` of ``n`` inside a sharded cache."""
    return f"shard-{i:05d}-of-{n:05d}"


_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a shard folder's name (``shard_name``)."""
    return _SHARD_RE.match(name) is not None


def check_shard(shard: tuple[int, int] | None) -> None:
    """``ValueError`` unless ``shard`` is ``None`` or ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return
    i, n = shard
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (i, n))
    if not ok or n < 1 or not 0 <= i < n:
        raise ValueError(
            f"shard={i!r} of shards={n!r} is invalid; shards must be >= 1 and shard in "
            f"0 .. shards - 1"
        )


def shard_from_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` under ``torchrun`` (``RANK`` / ``WORLD_SIZE``), else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0") or 0), world


def resolve_shard(
    shards: int | None, shard: int | None, device: str | None = None
) -> tuple[tuple[int, int] | None, str | None]:
    """The shard to write and the device, from ``--shards N --shard I`` or ``torchrun``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``RANK`` writes shard ``RANK`` of
    ``WORLD_SIZE`` unless told otherwise, and ``device="cuda"`` becomes the rank's own GPU
    (``cuda:LOCAL_RANK``). Returns ``(None, device)`` for an unsharded build.
    """
    env = shard_from_env()
    if shards is None and shard is None:
        if env is None:
            return None, device
        shards, shard = env[1], env[0]
    elif shards is None or shard is None:
        if env is None or shards not in (None, env[1]):
            given = "--shards" if shards is not None else "--shard"
            other = "--shard" if shards is not None else "--shards"
            raise ValueError(f"{given} needs {other} too (outside torchrun)")
        shards, shard = env[1], env[0] if shard is None else shard
    check_shard((shard, shards))
    if env is not None and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return (shard, shards) if shards > 1 else None, device


def _shard_folders(root: Path) -> tuple[int, dict[int, Path]]:
    """``(n, {i: folder of shard i})`` under ``root``.

    ``ValueError`` naming every shard that is missing or unfinished.
    """
    found: dict[int, tuple[int, Path]] = {}
    for p in root.iterdir() if root.is_dir() else []:
        hit = _SHARD_RE.match(p.name)
        if hit and p.is_dir():
            found[int(hit[1])] = (int(hit[2]), p)
    counts = {n for n, _ in found.values()}
    if len(counts) != 1:
        raise ValueError(
            f"{root}: shard folders disagree on the number of shards ({sorted(counts)})"
            if counts
            else f"{root}: no manifest.json and no shard folders: not a codebook-lens cache"
        )
    (n,) = counts
    missing = [
        shard_name(i, n)
        for i in range(n)
        if i not in found or not (found[i][1] / "manifest.json").is_file()
    ]
    if missing:
        partial = [s for s in missing if partial_path(root / s).exists()]
        raise ValueError(
            f"{root}: {len(missing)} of {n} shards are missing or unfinished: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            + (
                f" (interrupted, resumable with --resume: {', '.join(partial[:8])})"
                if partial
                else ""
            )
            + f"; build them with `codebook-lens cache ... --shards {n} --shard I`"
        )
    return n, {i: p for i, (_, p) in found.items()}


def shard_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a sharded cache, derived from its shards' manifests (deterministic).

    ``ValueError`` naming every shard that is missing or unfinished, or that disagrees.
    """
    n, folders = _shard_folders(root)
    shards = []
    first: dict[str, Any] | None = None
    for i in range(n):
        p = folders[i]
        m = read_manifest(p / "manifest.json")
        if m.get("kind") == "sharded" or m.get("shard") != [i, n]:
            raise ValueError(f"{p}/manifest.json: not shard {i} of {n} (field 'shard')")
        if first is None:
            first = m
        for key in ("identity", "codebooks", "seq_len", "tokenizer", "build"):
            if m.get(key) != first.get(key):
                raise ValueError(
                    f"{p}/manifest.json: {key} differs from {shard_name(0, n)}'s; the shards "
                    "were built with different models or settings"
                )
        shards.append(
            {
                "path": p.name,
                "n_tokens": int(m["n_tokens"]),
                "n_docs": int(m["n_docs"]),
                "manifest_blake2b": file_digest(p / "manifest.json"),
            }
        )
    assert first is not None
    build = dict(first.get("build") or {})
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "kind": "sharded",
        "identity": first["identity"],
        "tokenizer": first.get("tokenizer", ""),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_docs": sum(s["n_docs"] for s in shards),
        "seq_len": first.get("seq_len", 0),
        "codebooks": first["codebooks"],
        "omitted": first.get("omitted", []),
        "build": build,
        "created": first.get("created", {}),
        "shards": shards,
    }


class ShardedArray:
    """Several arrays with the same row shape read as one, rows in order (a sharded cache's
    tokens, offsets, document rows and codes). Indexing takes an int, a slice or an integer
    array for the rows (then anything numpy takes for the other axes) and returns numpy
    arrays; ``np.asarray`` reads all of it.
    """

    def __init__(self, parts: Sequence[Any], add: Sequence[int] | None = None) -> None:
        self.parts = list(parts)
        self.add = list(add) if add is not None else [0] * len(self.parts)
        lens = [len(p) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        first = self.parts[0]
        self.shape: tuple[int, ...] = (int(self.starts[-1]), *first.shape[1:])
        self.dtype: np.dtype[Any] = first.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def _part(self, i: int, rows: Any) -> np.ndarray:
        out = np.asarray(self.parts[i][rows])
        return out + self.add[i] if self.add[i] else out

    def _rows(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, int | np.integer):
            k = int(key) + (n if key < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {key} is out of bounds for axis 0 with size {n}")
            i = int(np.searchsorted(self.starts, k, side="right")) - 1
            return self._part(i, k - int(self.starts[i]))
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self._rows(np.arange(start, stop, step))
            if stop <= start:
                return self._part(0, slice(0, 0))
            lo = int(np.searchsorted(self.starts, start, side="right")) - 1
            hi = int(np.searchsorted(self.starts, stop, side="left"))
            pieces = [
                self._part(
                    i,
                    slice(
                        max(start, int(self.starts[i])) - int(self.starts[i]),
                        min(stop, int(self.starts[i + 1])) - int(self.starts[i]),
                    ),
                )
                for i in range(lo, hi)
            ]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows must be an int, a slice or integers, not {idx.dtype}")
        flat = idx.astype(np.int64).ravel()
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of bounds for axis 0 with size {n}")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            out[sel] = self._part(int(i), flat[sel] - self.starts[i])
        return out.reshape(*idx.shape, *self.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self._rows(key)
        if not key:
            return np.asarray(self)
        first, rest = key[0], key[1:]
        rows = self._rows(first)
        if isinstance(first, int | np.integer):
            return rows[rest]
        if isinstance(first, slice):
            return rows[(slice(None), *rest)]
        # An index array: numpy's rules for mixing it with the other axes' indices hold when
        # it is replaced by positions into the rows just read.
        idx = np.asarray(first)
        shape = (int(idx.sum()),) if idx.dtype == bool else idx.shape
        flat = rows.reshape(-1, *self.shape[1:])
        return flat[(np.arange(len(flat)).reshape(shape), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._rows(slice(None))
        return out if dtype is None else out.astype(dtype)

    def reshape(self, *shape: Any) -> ShardedArray:
        """Reshape every part's rows (the first axis stays the rows)."""
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if int(dims[0]) != self.shape[0]:
            raise ValueError(f"cannot reshape {self.shape} to {dims}: rows must stay")
        return ShardedArray([p.reshape(len(p), *dims[1:]) for p in self.parts], self.add)
