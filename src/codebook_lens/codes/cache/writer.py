"""Writing a cache: rows streamed into ``.npy`` files, checkpoints, resume, and the manifest.

Writing happens in a hidden ``.<name>.partial`` folder next to the cache that is renamed into
place at the end, so a cache folder is either complete or absent. A checkpoint fsyncs the
arrays, then replaces a small ``state.json`` atomically; a resumed writer truncates the arrays
to the last checkpoint and continues from there, giving the same bytes as a build that was
never interrupted.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from codebook_lens.codes.cache.files import file_digests, npy_header, npy_info
from codebook_lens.codes.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CodebookInfo,
    file_stem,
    partial_path,
)
from codebook_lens.codes.cache.index import build_index, count_codes
from codebook_lens.codes.cache.reader import CodeCache
from codebook_lens.codes.cache.shards import shard_manifest
from codebook_lens.config import __version__, read_json, write_json_atomic

_HEADER_BYTES = 128  # .npy header written ahead of appended rows (what np.save writes too)


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
        header = npy_header(self.dtype, (self.rows, *self.row_shape))
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
            cb.file = file_stem(cb.name, taken)
        self.codebooks = {cb.name: cb for cb in codebooks}
        self.identity, self.vocab, self.tokenizer = identity, vocab, tokenizer
        self.seq_len, self.extra = seq_len, dict(extra or {})
        self.build = dict(build or {})
        self.omitted, self.shard = list(omitted or []), shard
        self.cursor: dict[str, Any] | None = None
        """Where the caller's input stood at the checkpoint this writer resumed from."""
        self.phase = "encoding"
        self._done: list[str] = []  # codebooks whose counts/index are final
        self._doc: dict[str, Any] | None = None  # the open document
        self.n_docs = 0
        self._docs_file = self.tmp / "docs.jsonl"
        state = self._previous_state(resume=resume, overwrite=overwrite)
        if state is None:
            for sub in ("codes", "counts", "index", "vectors"):
                (self.tmp / sub).mkdir(parents=True)
            if any(cb.values for cb in codebooks):
                (self.tmp / "values").mkdir()
            self._open_streams(None)
        else:
            self._restore(state)
        for name, vec in (vectors or {}).items():
            self._write_vectors(name, vec)

    def _previous_state(self, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """The checkpoint of an interrupted build to resume, or ``None`` to start afresh."""
        state_file = self.tmp / "state.json"
        if not self.tmp.exists():
            return None
        if resume and state_file.is_file():
            state: dict[str, Any] = read_json(state_file)
            self._check_resumable(state)
            return state
        if resume or overwrite:
            shutil.rmtree(self.tmp)  # no checkpoint yet: nothing to keep
            return None
        raise ValueError(
            f"{self.tmp}: an interrupted build of {self.out} is here; pass "
            "resume=True (--resume) to continue it, or overwrite=True (--overwrite) "
            "to start over"
        )

    def _restore(self, state: dict[str, Any]) -> None:
        self.phase = state["phase"]
        self.cursor = state.get("cursor")
        self._done = list(state.get("done", []))
        self.n_docs = int(state["n_docs"])
        self._doc = state.get("open_doc")
        if self.phase == "encoding":
            self._open_streams(state)
        else:
            self._rows = int(state["rows"])

    def _write_vectors(self, name: str, vec: np.ndarray) -> None:
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
        self._values = {
            cb.name: _NpyStream(
                self.tmp / "values" / f"{cb.file}.npy", cb.values, (cb.k,), rows=rows
            )
            for cb in self.codebooks.values()
            if cb.values
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
        return [
            self._tokens,
            self._doc_ids,
            self._offsets,
            self._doc_index,
            *self._codes.values(),
            *self._values.values(),
        ]

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
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        codes: dict[str, np.ndarray],
        values: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append tokens of the current document.

        Args:
            tokens: ``(n,)`` token ids.
            offsets: ``(n, 2)`` character start/end in the document text.
            codes: ``{name: (n, [groups,] k)}`` code ids for every stored codebook (SAE
                codebooks: latent ids, ``num_codes`` in unfired slots).
            values: ``{name: (n, k)}`` activations of every codebook stored with values.
        """
        if self._doc is None:
            raise ValueError("add_document() must come before add_tokens()")
        n = len(tokens)
        if set(codes) != set(self.codebooks):
            raise ValueError(f"codes for {sorted(codes)}; expected {sorted(self.codebooks)}")
        values = values or {}
        if set(values) != set(self._values):
            raise ValueError(f"values for {sorted(values)}; expected {sorted(self._values)}")
        for name, c in codes.items():
            cb = self.codebooks[name]
            top = cb.num_codes if cb.unfired is None else cb.unfired + 1
            if c.size and (int(c.min()) < 0 or int(c.max()) >= top):
                raise ValueError(f"codes[{name!r}] has ids outside [0, {top - 1}]")
            if len(c) != n or (name in values and len(values[name]) != n):
                raise ValueError(f"codes[{name!r}] or values[{name!r}] do not have {n} rows")
            self._codes[name].append(c)
            if name in values:
                self._values[name].append(values[name])
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
        if self.phase == "encoding":
            self._close_arrays()
        self._count_and_index(progress)
        write_json_atomic(self.tmp / "vocab.json", self.vocab)
        (self.tmp / "state.json").unlink()
        # The state file is gone and the manifest not yet there: a kill now leaves a partial
        # folder without a checkpoint, which a resume restarts (the rare cost of a tiny window).
        write_json_atomic(self.tmp / "manifest.json", self._manifest(self._file_records(progress)))
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        return CodeCache(self.out)

    def _close_arrays(self) -> None:
        self._end_doc()
        self._doc_index.append(np.array([self._docs.size], dtype=np.int64))
        self._docs.sync()
        self._docs.close()
        n = self.n_tokens
        for s in self._streams:
            s.finish()
        self.phase, self._rows = "finishing", n
        self._save_state(None)

    def _count_and_index(self, progress: bool) -> None:
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
                    padded=cb.is_sae,
                )
            else:
                counts = count_codes(codes, cb.num_codes, padded=cb.is_sae)
            target = self.tmp / "counts" / f"{cb.file}.npy"
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, counts.reshape(cb.groups, cb.num_codes), allow_pickle=False)
            os.replace(tmp, target)
            self._done.append(cb.name)
            self._save_state(None)

    def _file_records(self, progress: bool) -> dict[str, Any]:
        """``{relative path: {shape, dtype, bytes, blake2b}}`` of every file written."""
        files = sorted(
            p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file()
        )
        digests = file_digests([self.tmp / f for f in files], progress, "checksums")
        records: dict[str, Any] = {}
        for rel, digest in zip(files, digests, strict=True):
            rec: dict[str, Any] = {"bytes": (self.tmp / rel).stat().st_size, "blake2b": digest}
            if rel.endswith(".npy"):
                shape, dtype, _ = npy_info(self.tmp / rel)
                rec = {"shape": list(shape), "dtype": dtype.name, **rec}
            records[rel] = rec
        return records

    def _manifest(self, records: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "kind": "single",
            "identity": self.identity,
            "tokenizer": self.tokenizer,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "seq_len": self.seq_len,
            "codebooks": [asdict(cb) for cb in self.codebooks.values()],
            "omitted": self.omitted,
            "shard": list(self.shard) if self.shard else None,
            "build": self.build,
            "created": {"time": _now(), "codebook_lens": __version__, **self.extra},
            "files": records,
        }

    def abort(self) -> None:
        """Drop everything written so far."""
        for s in self._streams:
            s.close()
        if self.phase == "encoding":
            self._docs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def merge_shards(root: str | os.PathLike[str]) -> CodeCache:
    """Write ``root/manifest.json`` listing its shards (no data is copied) and open the cache.

    ``ValueError`` if a shard is missing or unfinished. Safe to run from several processes at
    once: they write the same bytes.
    """
    root = Path(root)
    write_json_atomic(root / "manifest.json", shard_manifest(root))
    return CodeCache(root)
