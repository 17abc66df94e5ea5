"""A cache's files: ``.npy`` headers, BLAKE2b checksums, and checks against the manifest."""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from codebook_lens.codes.cache.format import CodebookInfo

_HASH_BLOCK = 1 << 23  # bytes hashed at once


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-256 of a file's bytes, as hex (read in blocks; releases the GIL while hashing)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: list[Path], progress: bool = False, desc: str = "checksums") -> list[str]:
    """``file_digest`` of every path, in order, hashed in threads."""
    # hashlib releases the GIL on large buffers, so threads hash files on every core.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(
            tqdm(pool.map(file_digest, paths), total=len(paths), desc=desc, disable=not progress)
        )


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (format 1.0) of an array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    fmt = np.lib.format
    fmt.write_array_header_1_0(
        buf, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue()


def npy_info(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """``(shape, dtype, header_bytes)`` of a ``.npy`` file, from its header alone.

    ``ValueError`` (naming the file) if it is not a readable ``.npy`` header.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            header = f.tell()
    except FileNotFoundError:
        raise
    except (ValueError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered arrays are not used in caches")
    return tuple(int(x) for x in shape), np.dtype(dtype), header


def _shape_str(shape: Sequence[int | None]) -> str:
    inner = ", ".join("?" if s is None else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _expected_files(
    m: dict[str, Any], path: Path
) -> dict[str, tuple[tuple[int | None, ...], str] | None]:
    """What a single (unsharded) cache's manifest implies about its files.

    ``{relative path: (shape, dtype) or None}``; ``None`` for non-array files, ``None`` in a
    shape for a free dimension (the vectors' width).
    """
    n = int(m["n_tokens"])
    version = int(m.get("version", 1))
    recorded = m.get("files") or {}
    out: dict[str, tuple[tuple[int | None, ...], str] | None] = {
        "tokens.npy": ((n,), "int32"),
        "doc_ids.npy": ((n,), "int32"),
        "offsets.npy": ((n, 2), "int32"),
        "docs.jsonl": None,
        "vocab.json": None,
    }
    if version >= 2:
        out["docs.index.npy"] = ((int(m["n_docs"]) + 1,), "int64")
    for d in m["codebooks"]:
        cb = CodebookInfo(**d)
        out[f"codes/{cb.file}.npy"] = ((n, *cb.code_shape), cb.dtype.name)
        if version >= 2:
            out[f"counts/{cb.file}.npy"] = ((cb.groups, cb.num_codes), "int64")
        if cb.indexed:
            n_keys = cb.groups * cb.num_codes
            pos_dtype = "int32" if n < 2**31 else "int64"
            out[f"index/{cb.file}.indptr.npy"] = ((n_keys + 1,), "int64")
            # SAE codebooks index only fired slots: as many as their counts add up to.
            n_pos = None if cb.is_sae else n * cb.groups * cb.k
            out[f"index/{cb.file}.positions.npy"] = ((n_pos,), pos_dtype)
        if cb.values:
            out[f"values/{cb.file}.npy"] = ((n, cb.k), cb.values)
        vec = f"vectors/{cb.file}.npy"
        if vec in recorded or (path / vec).exists():  # vectors are optional
            out[vec] = ((cb.groups, cb.num_codes, None), "float32")
    return out


@dataclass
class Problem:
    """One thing wrong with a cache file."""

    file: str
    """Path relative to the cache folder."""
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def check_files(path: Path, manifest: dict[str, Any], *, checksums: bool = False) -> list[Problem]:
    """Compare a single cache's files with its manifest.

    Always: every file is there, each array's header has the shape and dtype the manifest
    implies, and its size matches the header (a truncated file is caught). With
    ``checksums``: BLAKE2b of every file against the manifest (reads everything).
    """
    problems: list[Problem] = []
    recorded: dict[str, Any] = manifest.get("files") or {}
    try:
        expected = _expected_files(manifest, path)
    except (KeyError, TypeError, ValueError) as e:
        return [Problem("manifest.json", f"malformed ({type(e).__name__}: {e})")]
    for rel, spec in expected.items():
        p = path / rel
        if not p.is_file():
            problems.append(Problem(rel, "missing (the manifest lists it)"))
            continue
        size = p.stat().st_size
        rec = recorded.get(rel)
        if spec is not None:
            found = _array_problem(p, rel, spec, rec, size, manifest.get("n_tokens"))
            if found is not None:
                problems.append(found)
                continue
        if rec is not None and "bytes" in rec and int(rec["bytes"]) != size:
            problems.append(Problem(rel, f"{size} bytes, the manifest records {rec['bytes']}"))
    if checksums:
        problems += _checksum_problems(path, recorded, {q.file for q in problems})
    return problems


def _array_problem(
    p: Path,
    rel: str,
    spec: tuple[tuple[int | None, ...], str],
    rec: dict[str, Any] | None,
    size: int,
    n_tokens: Any,
) -> Problem | None:
    """What is wrong with the ``.npy`` file ``p`` against ``spec`` and its record, if anything."""
    want_shape, want_dtype = spec
    try:
        shape, dtype, header = npy_info(p)
    except ValueError as e:
        return Problem(rel, f"unreadable header: {e}")
    free_ok = len(shape) == len(want_shape) and all(
        w is None or w == s for w, s in zip(want_shape, shape, strict=False)
    )
    if not free_ok or dtype.name != want_dtype:
        return Problem(
            rel,
            f"expected shape {_shape_str(want_shape)} {want_dtype} (from the "
            f"manifest: n_tokens={n_tokens}), found {_shape_str(shape)} {dtype.name}",
        )
    if rec is not None and (list(rec.get("shape", shape)) != list(shape)):
        return Problem(rel, f"shape {_shape_str(shape)}, manifest records {rec['shape']}")
    data = math.prod(shape) * dtype.itemsize
    if size != header + data:
        return Problem(
            rel,
            f"{size} bytes, expected {header + data} for shape "
            f"{_shape_str(shape)} {dtype.name} (truncated or padded)",
        )
    return None


def _checksum_problems(path: Path, recorded: dict[str, Any], skip: set[str]) -> list[Problem]:
    """Files whose BLAKE2b differs from the manifest's (those in ``skip`` are not read)."""
    todo = [
        rel
        for rel, rec in recorded.items()
        if "blake2b" in rec and (path / rel).is_file() and rel not in skip
    ]
    return [
        Problem(
            rel,
            f"checksum mismatch (BLAKE2b {digest[:16]}..., manifest "
            f"{recorded[rel]['blake2b'][:16]}...): the bytes changed",
        )
        for rel, digest in zip(todo, file_digests([path / r for r in todo]), strict=True)
        if digest != recorded[rel]["blake2b"]
    ]


def problems_message(path: Path, problems: list[Problem]) -> str:
    """One error message for a cache whose files do not match its manifest."""
    shown = "; ".join(str(p) for p in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return (
        f"{path}: the cache does not match its manifest.json: {shown}{more}. "
        f"Run `codebook-lens verify {path}` for the full list, then rebuild the cache"
    )
