"""Code cache: run a codebook model over text once, keep every token's codes on disk.

A cache is a folder; every array is a ``.npy`` file read with ``np.load(mmap_mode="r",
allow_pickle=False)``, so opening a cache costs nothing and a query only touches the rows it
needs::

    manifest.json                  format, version, model identity, codebooks, counts, and
                                   every file's shape, dtype, size and BLAKE2b checksum
    tokens.npy                     (n_tokens,) int32 token ids
    doc_ids.npy                    (n_tokens,) int32 row of the token's document in docs.jsonl
    offsets.npy                    (n_tokens, 2) int32 character start/end in the document text
    docs.jsonl                     one {"id", "label", "start", "end", "text"} per document;
                                   start/end is its token range
    docs.index.npy                 (n_docs + 1,) int64 byte offset of each line of docs.jsonl
    vocab.json                     decoded string of every token id
    codes/<name>.npy               (n_tokens, [groups,] k) code ids, smallest unsigned dtype
    counts/<name>.npy              (groups, num_codes) int64 tokens on which each code fires
    index/<name>.indptr.npy        (groups * num_codes + 1,) int64  } inverted index (CSR):
    index/<name>.positions.npy     (n_tokens * groups * k,) int32   } key = group * C + code
    vectors/<name>.npy             (groups, num_codes, head_dim) float32 code vectors

``index`` answers "where does code X fire" in O(hits): the sorted token positions of key
``g * C + c`` are ``positions[indptr[key]:indptr[key + 1]]``. The index is optional per
codebook (it is twice the size of the codes); without it, positions come from a scan of the
codes, and search (which needs only the codes and the counts) is as fast as with it.

Documents are split into windows of ``seq_len`` tokens from the document start, each run
without earlier context; the same windows are used whenever activations are recomputed.

**Writing** happens in a hidden ``.<name>.partial`` folder next to the cache that is renamed
into place at the end, so a cache folder is either complete or absent. A build records a
checkpoint after every chunk of tokens (arrays fsynced, then a small ``state.json`` replaced
atomically); ``resume=True`` truncates the arrays to the last checkpoint and continues from
there, giving the same bytes as a build that was never interrupted.

**Shards**: several processes (``torchrun`` ranks, or machines with ``shard=(i, n)``) each
write ``<cache>/shard-0000i-of-0000n/``, a complete cache of a contiguous slice of the
documents. ``<cache>/manifest.json`` then lists the shards (it is written by whichever shard
finishes last, or derived on opening), and ``CodeCache(<cache>)`` reads them as one cache:
positions and documents in one global order, the concatenation of the shards.
"""

from __future__ import annotations

import datetime
import errno
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from codebook_lens.config import read_json, write_json_atomic

if TYPE_CHECKING:
    from codebook_lens.model.codebook_model import CodebookModel

CACHE_FORMAT = "codebook-lens-cache"
CACHE_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 caches (no checksums, counts or optional index) are still read."""
DEFAULT_CHUNK_TOKENS = 1 << 18
"""Tokens between two build checkpoints (what an interrupted build can lose)."""
_INDEX_CHUNK = 1 << 22  # (token, group, k) entries sorted at once while building an index
_SCAN_CHUNK = 1 << 22  # code entries compared at once when scanning for a code
_HEADER_BYTES = 128  # .npy header written ahead of appended rows (what np.save writes too)
_HASH_BLOCK = 1 << 23
_PARTIAL = ".partial"


class DocumentLike(Protocol):
    """What the cache needs from a document (``data.Document`` fits)."""

    id: str
    text: str
    label: str | None


@dataclass
class CodebookInfo:
    """One codebook stored in a cache."""

    name: str
    """Codebook name, e.g. ``layers.0.attn_heads``."""
    placement: str
    """'attn_heads', 'attn_out', 'mlp_out', 'residual' or 'module'."""
    layer: int | None
    """Block index (``None`` for module globs)."""
    groups: int
    """Heads (1 for ungrouped codebooks)."""
    grouped: bool
    """Whether the stored codes have a head axis: ``(n, groups, k)`` vs ``(n, k)``."""
    k: int
    """Codes per token (per head)."""
    num_codes: int
    """Codes per codebook (C)."""
    dim: int
    """Activation width at the site (all heads together)."""
    file: str = ""
    """File stem under ``codes/``, ``counts/``, ``index/`` and ``vectors/``."""
    indexed: bool = True
    """Whether the inverted index (``index/``) was built for this codebook."""

    @property
    def dtype(self) -> np.dtype[Any]:
        return code_dtype(self.num_codes)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one token's codes as stored: ``(groups, k)`` or ``(k,)``."""
        return (self.groups, self.k) if self.grouped else (self.k,)


@dataclass
class Doc:
    """A document in a cache: its text and its token range ``[start, end)``."""

    id: str
    label: str | None
    text: str
    start: int
    end: int


def code_dtype(num_codes: int) -> np.dtype[Any]:
    """Smallest unsigned integer type that holds ids ``0 .. num_codes - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _file_stem(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "codebook"
    base, i = stem, 1
    while stem in taken:
        stem, i = f"{base}_{i}", i + 1
    taken.add(stem)
    return stem


# ----------------------------------------------------------------- selection
def select_codebooks(
    names: Sequence[str], globs: Sequence[str] | None, what: str = "codebooks"
) -> list[str]:
    """The ``names`` matching any of ``globs`` (fnmatch), in their own order; ``None`` = all.

    A glob that matches nothing raises ``ValueError`` listing the names there are.
    """
    if globs is None:
        return list(names)
    if isinstance(globs, str):
        globs = [globs]
    for g in globs:
        if not isinstance(g, str) or not g:
            raise ValueError(f"{what}={list(globs)!r} is invalid; give codebook names or globs")
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            shown = ", ".join(list(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"{what}: the glob {g!r} matches no codebook; the model has {shown}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def select_index(spec: str | Sequence[str] | bool, names: Sequence[str]) -> list[str]:
    """Codebooks that get an inverted index: ``"all"`` (or True), ``"none"`` (or False) or
    globs over ``names``."""
    if (
        spec is True
        or spec == "all"
        or (not isinstance(spec, str | bool) and list(spec) == ["all"])
    ):
        return list(names)
    if (
        spec is False
        or spec == "none"
        or (not isinstance(spec, str | bool) and list(spec) == ["none"])
    ):
        return []
    globs = [spec] if isinstance(spec, str) else list(spec)  # type: ignore[arg-type]
    if any(g in ("all", "none") for g in globs):
        raise ValueError(f"index={globs!r} is invalid; give 'all', 'none' or codebook globs")
    return select_codebooks(names, globs, what="index")


# ------------------------------------------------------------------ identity
def model_identity(model: CodebookModel) -> dict[str, Any]:
    """What makes a model's codes comparable: its config, codebook names, code vectors and (if
    affine) the codebooks' LayerNorm weights."""
    base_cfg = getattr(model.base, "config", None)
    # Only the fields that decide which codes a token gets: new config fields with defaults
    # (training options, say) must not make every existing cache look foreign.
    code_fields = ("num_codes", "k", "similarity", "reduction", "layer_norm", "placements",
                   "layers", "modules")  # fmt: skip
    full = model.config.to_dict()
    fields = {f: full.get(f) for f in code_fields}
    # The affine LayerNorm changes every code, so it is part of the identity; only when on,
    # so the identity of a model without it (and every cache built before) stays the same.
    if full.get("layer_norm_affine"):
        fields["layer_norm_affine"] = True
    cfg_json = json.dumps(fields, sort_keys=True)
    h = hashlib.sha256()
    for name, layer in model.codebooks.items():
        h.update(name.encode())
        h.update(layer.codebook.detach().float().cpu().numpy().tobytes())
        for tag, p in ((b"ln_weight", layer.ln_weight), (b"ln_bias", layer.ln_bias)):
            if p is not None:  # affine LayerNorm only: absent parameters hash as before
                h.update(tag)
                h.update(p.detach().float().cpu().numpy().tobytes())
    return {
        "base_model": str(getattr(base_cfg, "_name_or_path", "") or ""),
        "model_type": str(getattr(base_cfg, "model_type", "") or ""),
        "vocab_size": int(getattr(base_cfg, "vocab_size", 0) or 0),
        "config_hash": hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
        "codebook_hash": h.hexdigest()[:16],
        "codebooks": list(model.codebooks),
    }


def check_identity(cache: CodeCache, model: CodebookModel) -> None:
    """Raise ``ValueError`` if ``cache`` was not built with ``model`` (same codes, same config).

    The base model path is informative only (the same model moves between folders).
    """
    want = model_identity(model)
    have = cache.manifest.get("identity", {})
    diffs = [
        f"{key}: cache has {have.get(key)!r}, model has {want[key]!r}"
        for key in ("model_type", "vocab_size", "config_hash", "codebooks", "codebook_hash")
        if have.get(key) != want[key]
    ]
    if diffs:
        raise ValueError(
            f"{cache.path}: this cache was built with a different model "
            f"(cache: {have.get('base_model')!r}, given: {want['base_model']!r}); "
            + "; ".join(diffs)
            + ". Rebuild the cache with `codebook-lens cache` for this model."
        )


# --------------------------------------------------------------------- files
def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-256 of a file's bytes, as hex (read in blocks; releases the GIL while hashing)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _digests(paths: list[Path], progress: bool = False, desc: str = "checksums") -> list[str]:
    from tqdm.auto import tqdm

    # hashlib releases the GIL on large buffers, so threads hash files on every core.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(
            tqdm(pool.map(file_digest, paths), total=len(paths), desc=desc, disable=not progress)
        )


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
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
            out[f"index/{cb.file}.positions.npy"] = ((n * cb.groups * cb.k,), pos_dtype)
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
            want_shape, want_dtype = spec
            try:
                shape, dtype, header = npy_info(p)
            except ValueError as e:
                problems.append(Problem(rel, f"unreadable header: {e}"))
                continue
            free_ok = len(shape) == len(want_shape) and all(
                w is None or w == s for w, s in zip(want_shape, shape, strict=False)
            )
            if not free_ok or dtype.name != want_dtype:
                problems.append(
                    Problem(
                        rel,
                        f"expected shape {_shape_str(want_shape)} {want_dtype} (from the "
                        f"manifest: n_tokens={manifest.get('n_tokens')}), found "
                        f"{_shape_str(shape)} {dtype.name}",
                    )
                )
                continue
            if rec is not None and (list(rec.get("shape", shape)) != list(shape)):
                problems.append(
                    Problem(rel, f"shape {_shape_str(shape)}, manifest records {rec['shape']}")
                )
                continue
            data = math.prod(shape) * dtype.itemsize
            if size != header + data:
                problems.append(
                    Problem(
                        rel,
                        f"{size} bytes, expected {header + data} for shape "
                        f"{_shape_str(shape)} {dtype.name} (truncated or padded)",
                    )
                )
                continue
        if rec is not None and "bytes" in rec and int(rec["bytes"]) != size:
            problems.append(Problem(rel, f"{size} bytes, the manifest records {rec['bytes']}"))
    if checksums:
        todo = [
            rel
            for rel, rec in recorded.items()
            if "blake2b" in rec
            and (path / rel).is_file()
            and not any(q.file == rel for q in problems)
        ]
        for rel, digest in zip(todo, _digests([path / r for r in todo]), strict=True):
            if digest != recorded[rel]["blake2b"]:
                problems.append(
                    Problem(
                        rel,
                        f"checksum mismatch (BLAKE2b {digest[:16]}..., manifest "
                        f"{recorded[rel]['blake2b'][:16]}...): the bytes changed",
                    )
                )
    return problems


def _problems_message(path: Path, problems: list[Problem]) -> str:
    shown = "; ".join(str(p) for p in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return (
        f"{path}: the cache does not match its manifest.json: {shown}{more}. "
        f"Run `codebook-lens verify {path}` for the full list, then rebuild the cache"
    )


# ------------------------------------------------------------------- writing
class _NpyStream:
    """Rows appended straight into a ``.npy`` file; ``finish`` writes the header for the final
    row count in the space kept for it (the bytes are what ``np.save`` would write)."""

    def __init__(
        self, path: Path, dtype: Any, row_shape: tuple[int, ...], *, rows: int | None = None
    ) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.row_bytes = self.dtype.itemsize * math.prod(row_shape)
        if rows is None:  # a new file
            self.rows = 0
            self._f: Any = open(path, "wb")  # noqa: SIM115 (closed in finish/close)
            self._f.write(b"\0" * _HEADER_BYTES)
        else:  # resume: drop whatever was written after the checkpoint
            self.rows = rows
            self._f = open(path, "r+b")  # noqa: SIM115
            self._f.truncate(_HEADER_BYTES + rows * self.row_bytes)
            self._f.seek(0, os.SEEK_END)

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.name}: rows of shape {arr.shape[1:]}, expected {self.row_shape}"
            )
        self._f.write(arr.tobytes())
        self.rows += arr.shape[0]

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self) -> None:
        header = _npy_header(self.dtype, (self.rows, *self.row_shape))
        if len(header) != _HEADER_BYTES:  # only for absurd shapes; an invariant, not user input
            raise AssertionError(f"{self.path.name}: header of {len(header)} bytes")
        self._f.seek(0)
        self._f.write(header)
        self.sync()
        self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class _ByteStream:
    """An append-only byte file that can be cut back to a checkpoint."""

    def __init__(self, path: Path, *, size: int | None = None) -> None:
        self.path = path
        self._f = open(path, "wb" if size is None else "r+b")  # noqa: SIM115
        if size is not None:
            self._f.truncate(size)
            self._f.seek(0, os.SEEK_END)
        self.size = size or 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.size += len(data)

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _now() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) pins the time, so two builds of the same
    # data give the same bytes down to the manifest.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch and epoch.isdigit()
        else datetime.datetime.now(datetime.timezone.utc)
    )
    return t.isoformat(timespec="seconds")


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where an unfinished build of ``out`` lives (hidden, next to it)."""
    out = Path(out)
    return out.parent / f".{out.name}{_PARTIAL}"


def _keep_partial(exc: BaseException | None) -> bool:
    """Interruptions (Ctrl-C, out of memory or disk) keep a resumable build; bad input does not."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | MemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class CacheWriter:
    """Write a cache folder piece by piece; ``finish()`` builds the indices and renames it.

    Use as a context manager: an exception removes the unfinished folder, leaving nothing,
    except after an interruption (Ctrl-C, out of memory or disk) of a build that recorded a
    ``checkpoint``: that one stays for ``resume=True``. ``add_document`` then ``add_tokens``
    for that document's tokens (any number of calls).

    Args:
        out: the cache folder to create.
        codebooks: what is stored; ``indexed`` says which get an inverted index.
        identity: the model's identity (``model_identity``).
        vocab: decoded string of every token id.
        resume: continue the unfinished build of ``out`` from its last checkpoint (the
            ``build`` settings must be the same); start afresh if there is none.
        build: settings that decide the cache's content, kept in the manifest and compared on
            resume.
        omitted: the model's codebooks that were left out (listed in the manifest).
        shard: ``(i, n)`` if this is shard ``i`` of ``n``.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        codebooks: list[CodebookInfo],
        identity: dict[str, Any],
        vocab: list[str],
        tokenizer: str = "",
        seq_len: int = 0,
        vectors: dict[str, np.ndarray] | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        build: dict[str, Any] | None = None,
        omitted: list[str] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.out = Path(out)
        if self.out.exists() and not (overwrite or resume):
            raise ValueError(
                f"{self.out}: already exists; choose another --out or pass overwrite=True "
                "(--overwrite) to replace it"
            )
        if not codebooks:
            raise ValueError("codebooks=[] is invalid; a cache needs at least one codebook")
        self.tmp = partial_path(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        for cb in codebooks:
            cb.file = _file_stem(cb.name, taken)
        self.codebooks = {cb.name: cb for cb in codebooks}
        self.identity, self.vocab, self.tokenizer = identity, vocab, tokenizer
        self.seq_len, self.extra = seq_len, dict(extra or {})
        self.build = dict(build or {})
        self.omitted, self.shard = list(omitted or []), shard
        self.cursor: dict[str, Any] | None = None
        """Where the caller's input stood at the checkpoint this writer resumed from."""
        self.phase = "encoding"
        self._done: list[str] = []  # codebooks whose counts/index are final
        state_file = self.tmp / "state.json"
        state = None
        if self.tmp.exists():
            if resume and state_file.is_file():
                state = read_json(state_file)
                self._check_resumable(state)
            elif resume or overwrite:
                shutil.rmtree(self.tmp)  # no checkpoint yet: nothing to keep
            else:
                raise ValueError(
                    f"{self.tmp}: an interrupted build of {self.out} is here; pass "
                    "resume=True (--resume) to continue it, or overwrite=True (--overwrite) "
                    "to start over"
                )
        self._docs_file = self.tmp / "docs.jsonl"
        if state is None:
            for sub in ("codes", "counts", "index", "vectors"):
                (self.tmp / sub).mkdir(parents=True)
            self._open_streams(None)
            self._doc: dict[str, Any] | None = None
            self.n_docs = 0
        else:
            self.phase = state["phase"]
            self.cursor = state.get("cursor")
            self._done = list(state.get("done", []))
            self.n_docs = int(state["n_docs"])
            self._doc = state.get("open_doc")
            if self.phase == "encoding":
                self._open_streams(state)
            else:
                self._rows = int(state["rows"])
        for name, vec in (vectors or {}).items():
            cb = self.codebooks[name]
            vec = np.asarray(vec, dtype=np.float32)
            if vec.shape[:2] != (cb.groups, cb.num_codes):
                raise ValueError(
                    f"vectors[{name!r}] has shape {vec.shape}, expected "
                    f"({cb.groups}, {cb.num_codes}, head_dim)"
                )
            target = self.tmp / "vectors" / f"{cb.file}.npy"
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, vec, allow_pickle=False)
            os.replace(tmp, target)

    def _open_streams(self, state: dict[str, Any] | None) -> None:
        rows = None if state is None else int(state["rows"])
        # docs.index has a row per closed document; the open one is in the state
        docs = None if state is None else int(state["n_docs"]) - (state.get("open_doc") is not None)
        self._tokens = _NpyStream(self.tmp / "tokens.npy", np.int32, (), rows=rows)
        self._doc_ids = _NpyStream(self.tmp / "doc_ids.npy", np.int32, (), rows=rows)
        self._offsets = _NpyStream(self.tmp / "offsets.npy", np.int32, (2,), rows=rows)
        self._doc_index = _NpyStream(self.tmp / "docs.index.npy", np.int64, (), rows=docs)
        self._codes = {
            cb.name: _NpyStream(
                self.tmp / "codes" / f"{cb.file}.npy", cb.dtype, cb.code_shape, rows=rows
            )
            for cb in self.codebooks.values()
        }
        size = None if state is None else int(state["docs_bytes"])
        self._docs = _ByteStream(self._docs_file, size=size)

    def _settings(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "codebooks": [asdict(cb) for cb in self.codebooks.values()],
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer,
            "vocab_size": len(self.vocab),
            "shard": list(self.shard) if self.shard else None,
            **self.build,
        }

    def _check_resumable(self, state: dict[str, Any]) -> None:
        old, new = state.get("settings", {}), json.loads(json.dumps(self._settings()))
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diffs:
            k = diffs[0]
            raise ValueError(
                f"{self.tmp}: the interrupted build used {k}={old.get(k)!r}, this one "
                f"{k}={new.get(k)!r}; resume with the same settings, or pass overwrite=True "
                "(--overwrite) without --resume to start over"
                + (f" (also differ: {', '.join(diffs[1:])})" if len(diffs) > 1 else "")
            )

    @property
    def n_tokens(self) -> int:
        return self._tokens.rows if self.phase == "encoding" else self._rows

    @property
    def _streams(self) -> list[_NpyStream]:
        if self.phase != "encoding":
            return []
        return [self._tokens, self._doc_ids, self._offsets, self._doc_index, *self._codes.values()]

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            return
        if _keep_partial(exc) and (self.tmp / "state.json").is_file():
            for s in self._streams:
                s.close()
            if self.phase == "encoding":
                self._docs.close()
            return
        self.abort()

    def _end_doc(self) -> None:
        if self._doc is not None:
            doc = {**self._doc, "end": self.n_tokens}
            row = {k: doc[k] for k in ("id", "label", "start", "end", "text")}
            self._doc_index.append(np.array([self._docs.size], dtype=np.int64))
            self._docs.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            self._doc = None

    def add_document(self, id: str, text: str, label: str | None = None) -> int:
        """Start a document; returns its row in ``docs.jsonl``."""
        if self.phase != "encoding":
            raise ValueError(f"{self.tmp}: the documents are complete; call finish()")
        self._end_doc()
        self._doc = {"id": str(id), "label": label, "text": text, "start": self.n_tokens}
        self.n_docs += 1
        return self.n_docs - 1

    def add_tokens(
        self, tokens: np.ndarray, offsets: np.ndarray, codes: dict[str, np.ndarray]
    ) -> None:
        """Append tokens of the current document.

        Args:
            tokens: ``(n,)`` token ids.
            offsets: ``(n, 2)`` character start/end in the document text.
            codes: ``{name: (n, [groups,] k)}`` code ids for every stored codebook.
        """
        if self._doc is None:
            raise ValueError("add_document() must come before add_tokens()")
        n = len(tokens)
        if set(codes) != set(self.codebooks):
            raise ValueError(f"codes for {sorted(codes)}; expected {sorted(self.codebooks)}")
        for name, c in codes.items():
            cb = self.codebooks[name]
            if c.size and (int(c.min()) < 0 or int(c.max()) >= cb.num_codes):
                raise ValueError(f"codes[{name!r}] has ids outside [0, {cb.num_codes - 1}]")
            if len(c) != n:
                raise ValueError(f"codes[{name!r}] has {len(c)} rows for {n} tokens")
            self._codes[name].append(c)
        self._tokens.append(np.asarray(tokens))
        self._doc_ids.append(np.full(n, self.n_docs - 1, dtype=np.int32))
        self._offsets.append(np.asarray(offsets))

    def _save_state(self, cursor: dict[str, Any] | None) -> None:
        write_json_atomic(
            self.tmp / "state.json",
            {
                "phase": self.phase,
                "settings": self._settings(),
                "rows": self.n_tokens,
                "n_docs": self.n_docs,
                "docs_bytes": self._docs.size if self.phase == "encoding" else None,
                "open_doc": self._doc,
                "cursor": cursor,
                "done": self._done,
            },
        )

    def checkpoint(self, cursor: dict[str, Any]) -> None:
        """Make everything written so far durable and record ``cursor`` (the caller's input
        position, JSON) with it; a resumed writer starts here and hands ``cursor`` back."""
        for s in self._streams:
            s.sync()
        self._docs.sync()
        self._save_state(cursor)

    def finish(self, progress: bool = False) -> CodeCache:
        """Close the arrays, count codes, build the indices, checksum, write the manifest and
        rename. Each step is recorded, so an interrupted finish resumes where it stopped."""
        from tqdm.auto import tqdm

        if self.phase == "encoding":
            self._end_doc()
            self._doc_index.append(np.array([self._docs.size], dtype=np.int64))
            self._docs.sync()
            self._docs.close()
            n = self.n_tokens
            for s in self._streams:
                s.finish()
            self.phase, self._rows = "finishing", n
            self._save_state(None)
        n = self.n_tokens
        todo = [cb for cb in self.codebooks.values() if cb.name not in self._done]
        for cb in tqdm(todo, desc="counts/index", disable=not progress):
            codes = np.load(self.tmp / "codes" / f"{cb.file}.npy", mmap_mode="r")
            codes = codes.reshape(n, cb.groups, cb.k)
            idx = self.tmp / "index"
            if cb.indexed:
                counts = build_index(
                    codes,
                    cb.num_codes,
                    idx / f"{cb.file}.indptr.npy",
                    idx / f"{cb.file}.positions.npy",
                )
            else:
                counts = count_codes(codes, cb.num_codes)
            target = self.tmp / "counts" / f"{cb.file}.npy"
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, counts.reshape(cb.groups, cb.num_codes), allow_pickle=False)
            os.replace(tmp, target)
            self._done.append(cb.name)
            self._save_state(None)
        write_json_atomic(self.tmp / "vocab.json", self.vocab)
        (self.tmp / "state.json").unlink()
        files = sorted(
            p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()
        )
        digests = _digests([self.tmp / f for f in files], progress, "checksums")
        records: dict[str, Any] = {}
        for rel, digest in zip(files, digests, strict=True):
            rec: dict[str, Any] = {"bytes": (self.tmp / rel).stat().st_size, "blake2b": digest}
            if rel.endswith(".npy"):
                shape, dtype, _ = npy_info(self.tmp / rel)
                rec = {"shape": list(shape), "dtype": dtype.name, **rec}
            records[rel] = rec
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "kind": "single",
            "identity": self.identity,
            "tokenizer": self.tokenizer,
            "n_tokens": n,
            "n_docs": self.n_docs,
            "seq_len": self.seq_len,
            "codebooks": [asdict(cb) for cb in self.codebooks.values()],
            "omitted": self.omitted,
            "shard": list(self.shard) if self.shard else None,
            "build": self.build,
            "created": {"time": _now(), "codebook_lens": _version(), **self.extra},
            "files": records,
        }
        # The state file is gone and the manifest not yet there: a kill now leaves a partial
        # folder without a checkpoint, which a resume restarts (the rare cost of a tiny window).
        write_json_atomic(self.tmp / "manifest.json", manifest)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        return CodeCache(self.out)

    def abort(self) -> None:
        """Drop everything written so far."""
        for s in self._streams:
            s.close()
        if self.phase == "encoding":
            self._docs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _version() -> str:
    from codebook_lens.config import __version__

    return __version__


def count_codes(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """``(groups * num_codes,)`` tokens on which each key ``g * C + c`` fires, for ``codes``
    ``(n, groups, k)``; read in chunks (bounded memory)."""
    n, groups, k = codes.shape
    n_keys = groups * num_codes
    offs = (np.arange(groups, dtype=np.int64) * num_codes)[None, :, None]
    rows = max(1, _INDEX_CHUNK // max(1, groups * k))
    counts = np.zeros(n_keys, dtype=np.int64)
    for s in range(0, n, rows):
        counts += np.bincount((codes[s : s + rows] + offs).ravel(), minlength=n_keys)
    return counts


def build_index(
    codes: np.ndarray, num_codes: int, indptr_path: Path, positions_path: Path
) -> np.ndarray:
    """Inverted index of ``codes`` ``(n, groups, k)``: key ``g * num_codes + c`` -> positions.

    Two passes over chunks (count, then place with a stable sort), so memory stays bounded
    whatever ``n``; positions of each key come out sorted. Both files are written under
    temporary names and renamed, so either is complete or absent. Returns the counts.
    """
    n, groups, k = codes.shape
    n_keys = groups * num_codes
    # Keys of at most 16 bits sort with numpy's radix sort (stable, linear time).
    key_dtype = np.uint16 if n_keys <= 1 << 16 else np.int64
    offs = (np.arange(groups, dtype=np.int64) * num_codes)[None, :, None]
    rows = max(1, _INDEX_CHUNK // max(1, groups * k))
    counts = count_codes(codes, num_codes)
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


# -------------------------------------------------------------------- shards
def shard_name(i: int, n: int) -> str:
    """Folder of shard ``i`` of ``n`` inside a sharded cache."""
    return f"shard-{i:05d}-of-{n:05d}"


_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


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


def _shard_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a sharded cache, derived from its shards' manifests (deterministic).

    ``ValueError`` naming every shard that is missing or unfinished, or that disagrees.
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
    shards = []
    first: dict[str, Any] | None = None
    for i in range(n):
        p = found[i][1]
        m = _read_manifest(p / "manifest.json")
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


def merge_shards(root: str | os.PathLike[str]) -> CodeCache:
    """Write ``root/manifest.json`` listing its shards (no data is copied) and open the cache.

    ``ValueError`` if a shard is missing or unfinished. Safe to run from several processes at
    once: they write the same bytes.
    """
    root = Path(root)
    write_json_atomic(root / "manifest.json", _shard_manifest(root))
    return CodeCache(root)


# ------------------------------------------------------------------- reading
def _read_manifest(p: Path) -> dict[str, Any]:
    manifest = read_json(p)
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{p}: not a codebook-lens cache (field 'format' should be {CACHE_FORMAT!r})"
        )
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{p}: version {manifest.get('version')!r} is not supported (this codebook-lens "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild the cache"
        )
    return manifest


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


class CodeCache:
    """A cache folder opened read-only (memory-mapped); cheap to open, safe to share.

    Opening checks every file against the manifest from its header and size alone (cheap);
    a mismatch raises ``ValueError`` naming the files, what was expected and what was found
    (``verify_cache`` also compares checksums). A sharded cache opens as one: its ``tokens``,
    ``doc_ids``, ``offsets`` and ``codes`` are ``ShardedArray`` views in global order.

    Derived arrays (document texts, global character offsets, token frequencies) are computed
    on first use and kept, so repeated queries (e.g. from the web app) stay fast.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            hint = ""
            if partial_path(self.path).exists():
                hint = f"; an interrupted build is in {partial_path(self.path)}: rerun it with --resume"
            raise FileNotFoundError(
                f"{self.path}: no such cache folder (build one with "
                f"`codebook-lens cache MODEL --data SRC --out DIR`){hint}"
            )
        mpath = self.path / "manifest.json"
        manifest = _read_manifest(mpath) if mpath.is_file() else _shard_manifest(self.path)
        self.manifest: dict[str, Any] = manifest
        self.sharded = manifest.get("kind") == "sharded"
        try:
            self.n_tokens: int = int(manifest["n_tokens"])
            self.n_docs: int = int(manifest["n_docs"])
            self.seq_len: int = int(manifest.get("seq_len", 0))
            self.codebooks: dict[str, CodebookInfo] = {
                d["name"]: CodebookInfo(**d) for d in manifest["codebooks"]
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
        self._derived: dict[str, Any] = {}
        self._shards: list[CodeCache] = []
        if self.sharded:
            self._open_shards()
        else:
            problems = check_files(self.path, manifest)
            if problems:
                raise ValueError(_problems_message(self.path, problems))
            self.token_starts = np.array([0, self.n_tokens], dtype=np.int64)
            self.doc_starts = np.array([0, self.n_docs], dtype=np.int64)
            self.tokens: Any = self._load("tokens.npy")
            self.doc_ids: Any = self._load("doc_ids.npy")
            self.offsets: Any = self._load("offsets.npy")

    def _open_shards(self) -> None:
        m = self.manifest
        parts = []
        for rec in m["shards"]:
            p = self.path / rec["path"]
            part = CodeCache(p)
            if (part.n_tokens, part.n_docs) != (rec["n_tokens"], rec["n_docs"]):
                raise ValueError(
                    f"{p}: holds {part.n_tokens} tokens and {part.n_docs} documents, "
                    f"{self.path}/manifest.json records {rec['n_tokens']} and {rec['n_docs']}; "
                    f"the shard was rebuilt after merging: delete {self.path}/manifest.json "
                    "to merge again"
                )
            if (
                "manifest_blake2b" in rec
                and file_digest(p / "manifest.json") != rec["manifest_blake2b"]
            ):
                raise ValueError(
                    f"{p}/manifest.json: differs from the one recorded in {self.path}/"
                    f"manifest.json (the shard was rebuilt after merging); delete "
                    f"{self.path}/manifest.json to merge again"
                )
            parts.append(part)
        if sum(p.n_tokens for p in parts) != self.n_tokens:
            raise ValueError(f"{self.path}/manifest.json: n_tokens is not the sum of its shards'")
        self._shards = parts
        self.token_starts = np.concatenate([[0], np.cumsum([p.n_tokens for p in parts])]).astype(
            np.int64
        )
        self.doc_starts = np.concatenate([[0], np.cumsum([p.n_docs for p in parts])]).astype(
            np.int64
        )
        self.tokens = ShardedArray([p.tokens for p in parts])
        self.doc_ids = ShardedArray([p.doc_ids for p in parts], add=self.doc_starts[:-1].tolist())
        self.offsets = ShardedArray([p.offsets for p in parts])

    @property
    def parts(self) -> list[CodeCache]:
        """The unsharded caches this one reads: its shards in order, or ``[self]``."""
        # Not stored as [self]: that cycle would keep a dropped cache (and its memory-mapped
        # pages, counted in the process's RSS once per mapping) alive until a garbage
        # collection instead of freeing it at once.
        return self._shards if self.sharded else [self]

    def __repr__(self) -> str:
        shards = f", shards={len(self.parts)}" if self.sharded else ""
        return (
            f"CodeCache({str(self.path)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
            f"codebooks={list(self.codebooks)}{shards})"
        )

    def _load(self, rel: str) -> np.ndarray:
        p = self.path / rel
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: missing from the cache (rebuild it)") from None
        except ValueError as e:
            raise ValueError(f"{p}: corrupted array file ({e})") from None

    def _memo(self, key: str, make: Any) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    # ------------------------------------------------------------ codebooks
    @property
    def omitted(self) -> list[str]:
        """The model's codebooks that this cache does not store (``--codebooks``)."""
        return list(self.manifest.get("omitted") or [])

    def notes(self) -> list[str]:
        """What this cache leaves out, in words (for search and the web app to show)."""
        out = []
        if self.omitted:
            globs = (self.manifest.get("build") or {}).get("codebook_globs")
            how = f" (built with --codebooks {' '.join(globs)})" if globs else ""
            out.append(
                f"{len(self.omitted)} of the model's {len(self.omitted) + len(self.codebooks)} "
                f"codebooks are not in this cache{how}: {', '.join(self.omitted[:6])}"
                + (" ..." if len(self.omitted) > 6 else "")
            )
        plain = [n for n, cb in self.codebooks.items() if not cb.indexed]
        if plain:
            out.append(
                f"{len(plain)} of {len(self.codebooks)} codebooks have no inverted index "
                f"(--index): finding where one of their codes fires scans the codes "
                f"(O(tokens)); search itself is unaffected"
            )
        if self.sharded:
            out.append(f"{len(self.parts)} shards, read as one cache")
        return out

    def info(self, codebook: str) -> CodebookInfo:
        """The codebook's description; ``ValueError`` naming the known ones if unknown."""
        if codebook not in self.codebooks:
            if codebook in self.omitted:
                globs = (self.manifest.get("build") or {}).get("codebook_globs") or []
                raise ValueError(
                    f"codebook={codebook!r} was not stored in this cache (it was built with "
                    f"--codebooks {' '.join(globs)}); it holds {list(self.codebooks)}. "
                    f"Rebuild it with --codebooks including {codebook!r} to search it"
                )
            raise ValueError(
                f"codebook={codebook!r} is not in this cache; choose one of {list(self.codebooks)}"
            )
        return self.codebooks[codebook]

    def check_code(self, codebook: str, code: int, head: int | None = None) -> int:
        """Validate a (codebook, code, head); returns the head to use (0 if ungrouped)."""
        cb = self.info(codebook)
        if (
            isinstance(code, bool)
            or not isinstance(code, int | np.integer)
            or not (0 <= code < cb.num_codes)
        ):
            raise ValueError(
                f"code={code!r} is out of range for codebook {codebook!r}; "
                f"it must be in 0 .. {cb.num_codes - 1}"
            )
        if cb.grouped:
            if head is None:
                raise ValueError(
                    f"codebook {codebook!r} has {cb.groups} heads; give head= "
                    f"(--head) in 0 .. {cb.groups - 1}"
                )
            if not 0 <= head < cb.groups:
                raise ValueError(
                    f"head={head!r} is out of range for codebook {codebook!r}; "
                    f"it must be in 0 .. {cb.groups - 1}"
                )
            return int(head)
        if head not in (None, 0):
            raise ValueError(f"head={head!r} is invalid: codebook {codebook!r} has no heads")
        return 0

    def codes(self, codebook: str) -> Any:
        """``(n_tokens, groups, k)`` code ids (a memory-mapped view; groups=1 if ungrouped)."""
        cb = self.info(codebook)
        if self.sharded:
            return self._memo(
                f"codes:{codebook}", lambda: ShardedArray([p.codes(codebook) for p in self.parts])
            )
        arr = self._memo(f"codes:{codebook}", lambda: self._load(f"codes/{cb.file}.npy"))
        return arr.reshape(self.n_tokens, cb.groups, cb.k)

    def index(self, codebook: str) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, positions)`` of the codebook's inverted index (key = head * C + code).

        Only for an unsharded cache and an indexed codebook (``positions`` works always).
        """
        cb = self.info(codebook)
        if self.sharded:
            raise ValueError(
                f"{self.path}: a sharded cache has one index per shard (cache.parts[i]."
                "index); use positions() for global positions"
            )
        if not cb.indexed:
            raise ValueError(
                f"codebook {codebook!r} has no inverted index in this cache (built with "
                "--index); positions() scans the codes instead"
            )
        return self._memo(  # type: ignore[no-any-return]
            f"index:{codebook}",
            lambda: (
                np.asarray(self._load(f"index/{cb.file}.indptr.npy")),
                self._load(f"index/{cb.file}.positions.npy"),
            ),
        )

    def positions(self, codebook: str, code: int, head: int | None = None) -> np.ndarray:
        """Sorted token positions where ``code`` (of ``head``) fires.

        O(hits) from the inverted index; a scan of the codes (O(tokens), in chunks) for a
        codebook built without one.
        """
        h = self.check_code(codebook, code, head)
        cb = self.info(codebook)
        out = []
        for start, part in zip(self.token_starts[:-1], self.parts, strict=True):
            if cb.indexed:
                indptr, pos = part.index(codebook)
                key = h * cb.num_codes + int(code)
                local = np.asarray(pos[indptr[key] : indptr[key + 1]], dtype=np.int64)
            else:
                local = part._scan(codebook, h, int(code))
            out.append(local + int(start))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _scan(self, codebook: str, head: int, code: int) -> np.ndarray:
        cb = self.info(codebook)
        codes = self.codes(codebook)
        rows = max(1, _SCAN_CHUNK // (cb.groups * cb.k))
        found = [
            np.flatnonzero((codes[s : s + rows, head, :] == code).any(axis=1)) + s
            for s in range(0, self.n_tokens, rows)
        ]
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)

    def code_counts(self, codebook: str) -> np.ndarray:
        """``(groups, num_codes)`` number of tokens on which each code fires."""
        cb = self.info(codebook)
        if self.sharded:
            return self._memo(  # type: ignore[no-any-return]
                f"counts:{codebook}", lambda: sum(p.code_counts(codebook) for p in self.parts)
            )
        rel = f"counts/{cb.file}.npy"
        if (self.path / rel).is_file():
            return self._memo(f"counts:{codebook}", lambda: np.asarray(self._load(rel)))  # type: ignore[no-any-return]
        indptr, _ = self.index(codebook)  # version 1 caches: counts from the index
        return np.diff(indptr).reshape(cb.groups, cb.num_codes)

    def vectors(self, codebook: str) -> np.ndarray | None:
        """``(groups, num_codes, head_dim)`` code vectors, or ``None`` if not stored."""
        if self.sharded:
            self.info(codebook)
            return self.parts[0].vectors(codebook)
        rel = f"vectors/{self.info(codebook).file}.npy"
        if not (self.path / rel).exists():
            return None
        return self._memo(f"vec:{codebook}", lambda: self._load(rel))  # type: ignore[no-any-return]

    # --------------------------------------------------------------- text
    def iter_docs(self, start: int = 0, stop: int | None = None) -> Iterator[Doc]:
        """Documents ``start .. stop - 1`` read one at a time (memory: one document)."""
        stop = self.n_docs if stop is None else min(stop, self.n_docs)
        if "docs" in self._derived:
            yield from self._derived["docs"][start:stop]
            return
        for i, part in enumerate(self.parts):
            d0, d1 = int(self.doc_starts[i]), int(self.doc_starts[i + 1])
            lo, hi = max(start, d0), min(stop, d1)
            if lo >= hi:
                continue
            shift = int(self.token_starts[i])
            for doc in part._iter_own_docs(lo - d0, hi - d0):
                if shift:
                    doc.start, doc.end = doc.start + shift, doc.end + shift
                yield doc

    def _iter_own_docs(self, start: int, stop: int) -> Iterator[Doc]:
        p = self.path / "docs.jsonl"
        index = self.path / "docs.index.npy"
        try:
            with open(p, "rb") as f:
                if index.is_file():
                    f.seek(int(np.load(index, mmap_mode="r")[start]))
                    skip = 0
                else:
                    skip = start
                for i, line in enumerate(f):
                    if i < skip:
                        continue
                    if i - skip >= stop - start:
                        break
                    yield Doc(**json.loads(line))
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: missing from the cache (rebuild it)") from None

    @property
    def docs(self) -> list[Doc]:
        """Every document (text and token range), read once."""
        return self._memo("docs", lambda: list(self.iter_docs()))  # type: ignore[no-any-return]

    def _doc_meta(self) -> tuple[list[str | None], np.ndarray]:
        def make() -> tuple[list[str | None], np.ndarray]:
            labels, ranges = [], np.zeros((self.n_docs, 2), dtype=np.int64)
            for i, d in enumerate(self.iter_docs()):
                labels.append(d.label)
                ranges[i] = d.start, d.end
            return labels, ranges

        return self._memo("doc_meta", make)  # type: ignore[no-any-return]

    @property
    def doc_labels(self) -> list[str | None]:
        """Every document's label (read once, without keeping the texts)."""
        return self._doc_meta()[0]

    @property
    def doc_ranges(self) -> np.ndarray:
        """``(n_docs, 2)`` token range ``[start, end)`` of every document."""
        return self._doc_meta()[1]

    @property
    def vocab(self) -> list[str]:
        """Decoded string of every token id."""
        src = self.parts[0] if self.sharded else self
        return self._memo("vocab", lambda: read_json(src.path / "vocab.json"))  # type: ignore[no-any-return]

    def token_str(self, token_id: int) -> str:
        v = self.vocab
        return v[token_id] if 0 <= token_id < len(v) else f"<{token_id}>"

    @property
    def doc_char_base(self) -> np.ndarray:
        """``(n_docs,)`` start of each document in the texts joined by ``\\x00``."""

        def make() -> np.ndarray:
            lens = np.array([len(d.text) + 1 for d in self.iter_docs()], dtype=np.int64)
            return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)

        return self._memo("char_base", make)  # type: ignore[no-any-return]

    @property
    def global_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` of every token in the joined text, each non-decreasing."""

        def make() -> tuple[np.ndarray, np.ndarray]:
            base = self.doc_char_base[np.asarray(self.doc_ids)]
            off = np.asarray(self.offsets, dtype=np.int64)
            # Keep both sorted for searchsorted (tokenizers emit monotonic offsets already).
            starts = np.maximum.accumulate(base + off[:, 0])
            ends = np.maximum.accumulate(base + off[:, 1])
            return starts, ends

        return self._memo("spans", make)  # type: ignore[no-any-return]

    @property
    def token_frequencies(self) -> np.ndarray:
        """``(vocab,)`` occurrences of each token id in the cache."""

        def make() -> np.ndarray:
            out = np.zeros(len(self.vocab), dtype=np.int64)
            for s in range(0, self.n_tokens, _SCAN_CHUNK):
                out += np.bincount(
                    np.asarray(self.tokens[s : s + _SCAN_CHUNK]), minlength=len(out)
                )[: len(out)]
            return out

        return self._memo("tokfreq", make)  # type: ignore[no-any-return]

    def token_text(self, position: int) -> str:
        """The exact text of the token at ``position``."""
        doc = self.docs[int(self.doc_ids[position])]
        s, e = (int(x) for x in self.offsets[position])
        return doc.text[s:e]

    def windows(self, limit: int | None = None) -> Iterator[tuple[int, int]]:
        """Token ranges ``[start, end)`` run together when the cache was built."""
        limit = self.n_tokens if limit is None else min(limit, self.n_tokens)
        step = self.seq_len or self.n_tokens or 1
        for d in self.iter_docs():
            for s in range(d.start, min(d.end, limit), step):
                yield s, min(s + step, d.end, limit)
            if d.end >= limit:
                return


def load_cache(path: str | os.PathLike[str]) -> CodeCache:
    """Open a cache folder (memory-mapped)."""
    return CodeCache(path)


def verify_cache(path: str | os.PathLike[str], *, checksums: bool = True) -> list[Problem]:
    """Every problem with a cache: missing files, shapes, dtypes and sizes against the
    manifest, and (``checksums``) BLAKE2b of every file. ``[]`` means the cache is intact.

    For a sharded cache, each shard is checked too (paths are relative to ``path``).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such cache folder")
    mpath = path / "manifest.json"
    if not mpath.is_file() and not any(_SHARD_RE.match(p.name) for p in path.iterdir()):
        raise ValueError(
            f"{path}: no manifest.json and no shard folders: not a codebook-lens cache"
        )
    try:
        manifest = _read_manifest(mpath) if mpath.is_file() else _shard_manifest(path)
    except ValueError as e:
        return [Problem("manifest.json", str(e))]
    if manifest.get("kind") != "sharded":
        return check_files(path, manifest, checksums=checksums)
    problems = []
    total = 0
    for rec in manifest.get("shards", []):
        sub = path / rec["path"]
        if not (sub / "manifest.json").is_file():
            problems.append(Problem(f"{rec['path']}/manifest.json", "missing"))
            continue
        if (
            "manifest_blake2b" in rec
            and file_digest(sub / "manifest.json") != rec["manifest_blake2b"]
        ):
            problems.append(
                Problem(
                    f"{rec['path']}/manifest.json",
                    "differs from the checksum recorded in manifest.json (rebuilt after "
                    "merging; delete manifest.json to merge again)",
                )
            )
        for p in verify_cache(sub, checksums=checksums):
            problems.append(Problem(f"{rec['path']}/{p.file}", p.what))
        total += int(rec.get("n_tokens", 0))
    if total != int(manifest.get("n_tokens", -1)):
        problems.append(
            Problem(
                "manifest.json", f"n_tokens={manifest.get('n_tokens')}, the shards hold {total}"
            )
        )
    return problems


# ------------------------------------------------------------------ building
def interleave_labels(documents: Iterable[DocumentLike]) -> list[DocumentLike]:
    """Documents taking turns over labels (in order within each label), so that a cache cut
    at N tokens holds every label of a corpus stored topic by topic (e.g. BBC)."""
    groups: dict[str | None, list[DocumentLike]] = {}
    for d in documents:
        groups.setdefault(getattr(d, "label", None), []).append(d)
    out: list[DocumentLike] = []
    lists = list(groups.values())
    for i in range(max((len(g) for g in lists), default=0)):
        out.extend(g[i] for g in lists if i < len(g))
    return out


def _vocab_strings(tokenizer: Any) -> list[str]:
    n = len(tokenizer)
    return [str(s) for s in tokenizer.batch_decode([[i] for i in range(n)])]


def _codebook_infos(model: CodebookModel) -> list[CodebookInfo]:
    out = []
    for s in model.sites:
        layer = model.codebooks[s.name]
        out.append(
            CodebookInfo(
                name=s.name,
                placement=s.placement,
                layer=s.layer,
                groups=layer.groups,
                grouped=layer.grouped,
                k=layer.k,
                num_codes=layer.num_codes,
                dim=layer.dim,
            )
        )
    return out


def _shard_plan(
    tokenizer: Any, documents: Sequence[DocumentLike], max_tokens: int, shard: tuple[int, int]
) -> list[tuple[DocumentLike, int]]:
    """This shard's ``(document, tokens kept)``: the documents an unsharded build would take
    (in order, the last one cut at ``max_tokens``), split into ``n`` contiguous runs of about
    equal tokens; a document goes to the shard its first token falls in."""
    i, n = shard
    kept: list[tuple[int, int]] = []
    total = 0
    block = 256
    for b in range(0, len(documents), block):
        texts = [d.text for d in documents[b : b + block]]
        for j, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            take = min(len(ids), max_tokens - total)
            if take > 0:
                kept.append((b + j, take))
                total += take
        if total >= max_tokens:
            break
    if not kept:
        return []
    lengths = np.array([t for _, t in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = starts * n // int(lengths.sum())
    return [(documents[d], t) for (d, t), o in zip(kept, owner, strict=True) if o == i]


def build_cache(
    model: CodebookModel,
    tokenizer: Any,
    documents: Iterable[DocumentLike],
    out: str | os.PathLike[str],
    *,
    max_tokens: int = 100_000,
    seq_len: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    source: str = "",
    codebooks: Sequence[str] | None = None,
    index: str | Sequence[str] | bool = "all",
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> CodeCache:
    """Run ``model`` over ``documents`` and write a cache of at most ``max_tokens`` tokens.

    Args:
        model: a ``CodebookModel`` (its device is used; it is put in eval mode meanwhile).
        tokenizer: a Hugging Face *fast* tokenizer (character offsets come from it).
        documents: objects with ``.id``, ``.text`` and ``.label``.
        out: the cache folder (written to a hidden partial folder, renamed at the end).
        max_tokens: stop after this many tokens (the last document is cut).
        seq_len: window length; default the model's maximum positions (at most 1024).
        batch_size: windows per forward pass.
        codebooks: globs over the model's codebook names to store (default all).
        index: which stored codebooks get an inverted index: ``"all"``, ``"none"`` or globs.
        resume: continue an interrupted build of ``out`` from its last checkpoint (same
            settings); the result is byte-identical to an uninterrupted build. Without a
            checkpoint it starts afresh; on a complete cache it returns it.
        shard: ``(i, n)``: write shard ``i`` of ``n`` into ``out/shard-...``; every shard
            takes a contiguous run of the documents an unsharded build would take, and the
            shards together open as that cache (``out/manifest.json`` is written by the shard
            that completes the set).
        chunk_tokens: tokens between checkpoints.
    """
    import torch
    from tqdm.auto import tqdm

    from codebook_lens.model.codebook_model import eval_mode

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; it must be an integer >= 1")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid; it must be an integer >= 1")
    check_shard(shard)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; the cache needs "
            "character offsets (return_offsets_mapping), which only fast tokenizers give"
        )
    base_cfg = getattr(model.base, "config", None)
    if seq_len is None:
        seq_len = min(
            int(
                getattr(base_cfg, "max_position_embeddings", 0)
                or getattr(base_cfg, "n_positions", 0)
                or 1024
            ),
            1024,
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid; it must be an integer >= 1")
    all_infos = _codebook_infos(model)
    stored = select_codebooks([c.name for c in all_infos], codebooks, what="codebooks")
    indexed = set(select_index(index, stored))
    infos = [c for c in all_infos if c.name in stored]
    for c in infos:
        c.indexed = c.name in indexed
    root = Path(out)
    target = root / shard_name(*shard) if shard else root
    build = {
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "source": source,
        "codebook_globs": list(codebooks) if codebooks is not None else None,
        "index": index if isinstance(index, str | bool) else list(index),
    }
    if resume and (target / "manifest.json").is_file() and not partial_path(target).exists():
        done = CodeCache(target)  # finished before: nothing to do
        if shard:
            _maybe_merge(root)
        return done
    if shard:
        if (root / "manifest.json").is_file() and overwrite:
            (root / "manifest.json").unlink()  # a shard is rebuilt: the old merge is stale
        items: Iterable[tuple[DocumentLike, int | None]] = _shard_plan(
            tokenizer, list(documents), max_tokens, shard
        )
        if not items:
            raise ValueError(
                f"shard {shard[0]} of {shard[1]} gets no documents from "
                f"{source or 'the data'}; use fewer shards"
            )
    else:
        items = ((d, None) for d in documents)
    device = next(model.parameters()).device
    vectors = {
        name: layer.codebook.detach().float().cpu().numpy()
        for name, layer in model.codebooks.items()
        if name in stored
    }
    writer = CacheWriter(
        target,
        codebooks=infos,
        identity=model_identity(model),
        vocab=_vocab_strings(tokenizer),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        seq_len=seq_len,
        vectors=vectors,
        extra={"source": source, "max_tokens": max_tokens},
        overwrite=overwrite,
        resume=resume,
        build=build,
        omitted=[c.name for c in all_infos if c.name not in stored],
        shard=shard,
    )
    cursor = writer.cursor or {"doc": -1, "window": 0, "total": 0}
    budget = max_tokens if shard is None else sum(t for _, t in items)  # type: ignore[misc]
    bar = tqdm(
        total=budget, initial=writer.n_tokens, unit="tok", desc="cache", disable=not progress
    )
    # Documents and windows in reading order; replayed into the writer once a batch has run.
    queue: list[tuple[Any, ...]] = []
    windows: list[np.ndarray] = []
    last_checkpoint = writer.n_tokens

    def flush() -> None:
        results: list[dict[str, np.ndarray]] = []
        if windows:
            width = max(len(w) for w in windows)
            ids = torch.zeros(len(windows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, w in enumerate(windows):
                ids[i, : len(w)] = torch.from_numpy(w.astype(np.int64))
                mask[i, : len(w)] = 1
            with torch.no_grad():
                codes = model.get_codes(ids.to(device), attention_mask=mask.to(device))
            host = {n: codes[n].cpu().numpy() for n in stored}
            for i, w in enumerate(windows):
                results.append(
                    {cb.name: host[cb.name][i, : len(w)].astype(cb.dtype) for cb in infos}
                )
        for item in queue:
            if item[0] == "doc":
                writer.add_document(*item[1:])
            else:
                _, i, toks, offs = item
                writer.add_tokens(toks, offs, results[i])
                bar.update(len(toks))
        queue.clear()
        windows.clear()
        if delay > 0:
            time.sleep(delay)

    # Fault-injection aid: crash tests slow each batch down so that kills land mid-build
    # however fast the machine is.
    delay = float(os.environ.get("CODEBOOK_LENS_CACHE_BATCH_DELAY", "0") or 0)
    with eval_mode(model):  # each module's own mode comes back afterwards
        try:
            with writer:
                if writer.phase == "encoding":
                    total = int(cursor["total"])
                    for d_i, (doc, cap) in enumerate(items):
                        if d_i < cursor["doc"]:
                            continue  # written before the interruption
                        if cap is None and total >= max_tokens:
                            break
                        enc = tokenizer(
                            doc.text, add_special_tokens=False, return_offsets_mapping=True
                        )
                        keep = max_tokens - total if cap is None else cap
                        toks = np.asarray(enc["input_ids"], dtype=np.int32)[:keep]
                        if not len(toks):
                            continue
                        offs = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
                        offs = offs[: len(toks)]
                        first = 0
                        if d_i == cursor["doc"]:
                            first = int(cursor["window"])  # this document is open already
                        else:
                            queue.append(("doc", doc.id, doc.text, getattr(doc, "label", None)))
                        for s in range(first, len(toks), seq_len):
                            queue.append(
                                ("win", len(windows), toks[s : s + seq_len], offs[s : s + seq_len])
                            )
                            windows.append(toks[s : s + seq_len])
                            if len(windows) >= batch_size:
                                flush()
                                if writer.n_tokens - last_checkpoint >= chunk_tokens:
                                    writer.checkpoint(
                                        {"doc": d_i, "window": s + seq_len, "total": total}
                                    )
                                    last_checkpoint = writer.n_tokens
                        total += len(toks)
                    flush()
                if writer.n_tokens == 0:
                    raise ValueError(
                        f"documents from {source or 'the data'} gave no tokens; nothing to cache"
                    )
                bar.close()
                cache = writer.finish(progress=progress)
        finally:
            bar.close()
    if shard:
        _maybe_merge(root)
    return cache


def _maybe_merge(root: Path) -> CodeCache | None:
    """Write the sharded cache's manifest if every shard is complete (else leave it)."""
    try:
        return merge_shards(root)
    except ValueError:
        return None


# ----------------------------------------------------------------- synthetic
_WORDS = (  # noqa: SIM905 (one readable string)
    "the of and to in a is that for it as was with be by on not he I this are or his from at "
    "which but have an they you were her she there one all we their has been would when who "
    "will more no if out so said what up its about into than them can only other new some "
    "could time these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take "
    "three January February March April May June July August September October November "
    "December team goal match market shares profit phone software film music election"
).split()


def synthetic_cache(
    out: str | os.PathLike[str],
    *,
    n_tokens: int = 10_000,
    n_codebooks: int = 2,
    num_codes: int = 64,
    k: int = 2,
    groups: int = 1,
    doc_tokens: int = 200,
    plant: dict[str, int] | None = None,
    labels: tuple[str, ...] = ("business", "sport", "tech"),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    index: str | Sequence[str] | bool = "all",
    shards: int = 1,
) -> CodeCache:
    """A cache of random English-like words and random codes, for tests and benchmarks.

    Codes are distinct within each token (and head). ``plant={"May": 7}`` makes code 7 of the
    first codebook (head 0) fire exactly on the word "May" and nowhere else (the other heads of
    that codebook never use planted ids). Codebooks are named
    ``layers.{i}.mlp_out`` (``layers.{i}.attn_heads`` with ``groups`` heads if ``groups > 1``).
    Token ``i`` is word ``i`` at a document start, token ``len(words) + i`` is " word".
    ``index`` as in ``build_cache``; ``shards > 1`` writes the same data as that many shards
    (contiguous runs of documents) of one cache.
    """
    from tqdm.auto import tqdm

    if k > num_codes - 1:
        raise ValueError(f"k={k} is invalid; it must be < num_codes={num_codes}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards={shards!r} is invalid; it must be an integer >= 1")
    rng = np.random.default_rng(seed)
    words = list(_WORDS)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    probs = zipf / zipf.sum()
    vocab = words + [" " + w for w in words]
    placement = "attn_heads" if groups > 1 else "mlp_out"

    def infos() -> list[CodebookInfo]:
        made = [
            CodebookInfo(
                f"layers.{i}.{placement}",
                placement,
                i,
                groups,
                groups > 1,
                k,
                num_codes,
                16 * groups,
            )
            for i in range(n_codebooks)
        ]
        indexed = set(select_index(index, [c.name for c in made]))
        for c in made:
            c.indexed = c.name in indexed
        return made

    names = [c.name for c in infos()]
    identity = {
        "base_model": "synthetic",
        "model_type": "synthetic",
        "vocab_size": len(vocab),
        "config_hash": f"seed{seed}",
        "codebook_hash": f"seed{seed}",
        "codebooks": names,
    }
    vectors = {
        name: rng.standard_normal((groups, num_codes, 16)).astype(np.float32) for name in names
    }
    planted_code: dict[int, int] = {}
    for word, code in (plant or {}).items():
        if word not in words or not 0 <= code < num_codes:
            raise ValueError(
                f"plant={plant!r} is invalid; use words of the built-in list and codes in "
                f"0 .. {num_codes - 1}"
            )
        planted_code[words.index(word)] = code
    reserved = sorted(set(planted_code.values()))
    root = Path(out)
    if shards > 1 and (root / "manifest.json").is_file() and overwrite:
        (root / "manifest.json").unlink()

    def writer(i: int) -> CacheWriter:
        return CacheWriter(
            root / shard_name(i, shards) if shards > 1 else root,
            codebooks=infos(),
            identity=identity,
            vocab=vocab,
            tokenizer="words",
            seq_len=doc_tokens,
            vectors=vectors,
            overwrite=overwrite,
            extra={"source": "synthetic"},
            shard=(i, shards) if shards > 1 else None,
        )

    bar = tqdm(total=n_tokens, unit="tok", desc="synthetic", disable=not progress)
    done, d, current = 0, 0, 0
    w = writer(0)
    try:
        while done < n_tokens:
            if shards > 1 and done * shards // n_tokens > current:  # the next shard starts
                w.finish(progress=progress)
                current = done * shards // n_tokens
                w = writer(current)
            n = min(doc_tokens, n_tokens - done)
            word_ids = rng.choice(len(words), size=n, p=probs)
            pieces = [words[i] if j == 0 else " " + words[i] for j, i in enumerate(word_ids)]
            lens = np.array([len(piece) for piece in pieces])
            ends = np.cumsum(lens)
            offsets = np.stack([ends - lens, ends], axis=1)
            offsets[1:, 0] += 1  # a token's leading space is not part of its word
            tokens = np.where(np.arange(n) == 0, word_ids, word_ids + len(words))
            codes = {}
            for ci, name in enumerate(names):
                free = num_codes - (len(reserved) if ci == 0 else 0)
                # Distinct codes per token: a random start plus k-1 positive steps < free.
                start = rng.integers(0, free, size=(n, groups, 1))
                steps = rng.integers(1, max(2, free // k + 1), size=(n, groups, k - 1))
                cc = np.concatenate([start, start + np.cumsum(steps, axis=2)], axis=2) % free
                if ci == 0 and reserved:
                    head0 = cc[:, 0]  # a view: edits land in cc
                    for r in reserved:  # shift ids up past each reserved (planted) code
                        head0[head0 >= r] += 1
                    for wi, code in planted_code.items():
                        rows = np.flatnonzero(word_ids == wi)
                        head0[rows, rng.integers(0, k, size=len(rows))] = code
                arr = cc if groups > 1 else cc[:, 0]
                codes[name] = arr.astype(code_dtype(num_codes))
            label = labels[d % len(labels)] if labels else None
            w.add_document(f"doc{d}", "".join(pieces), label)
            w.add_tokens(tokens, offsets, codes)
            done += n
            d += 1
            bar.update(n)
        bar.close()
        cache = w.finish(progress=progress)
    except BaseException:
        w.abort()
        raise
    return merge_shards(root) if shards > 1 else cache
