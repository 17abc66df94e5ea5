"""Reading a cache: ``CodeCache`` opens a folder (memory-mapped), ``verify_cache`` checks one.

A sharded cache opens as one: positions and documents in one global order, the concatenation
of its shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from codebook_lens.codes.cache.files import Problem, check_files, file_digest, problems_message
from codebook_lens.codes.cache.format import CodebookInfo, Doc, partial_path, read_manifest
from codebook_lens.codes.cache.shards import ShardedArray, is_shard_name, shard_manifest
from codebook_lens.config import read_json

_SCAN_CHUNK = 1 << 22  # code entries compared at once when scanning for a code


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
        manifest = read_manifest(mpath) if mpath.is_file() else shard_manifest(self.path)
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
                raise ValueError(problems_message(self.path, problems))
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

    def values(self, codebook: str) -> Any:
        """``(n_tokens, k)`` activations of an SAE codebook's stored latents, slot by slot
        (``0`` in unfired slots); ``ValueError`` for a codebook stored without them."""
        cb = self.info(codebook)
        if not cb.values:
            raise ValueError(
                f"codebook {codebook!r} has no activation values (it is a {cb.kind!r}; only "
                "SAE codebooks store them)"
            )
        if self.sharded:
            return self._memo(
                f"values:{codebook}", lambda: ShardedArray([p.values(codebook) for p in self.parts])
            )
        return self._memo(f"values:{codebook}", lambda: self._load(f"values/{cb.file}.npy"))

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
    if not mpath.is_file() and not any(is_shard_name(p.name) for p in path.iterdir()):
        raise ValueError(
            f"{path}: no manifest.json and no shard folders: not a codebook-lens cache"
        )
    try:
        manifest = read_manifest(mpath) if mpath.is_file() else shard_manifest(path)
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
