"""Code cache: run a codebook model over text once, keep every token's codes on disk.

A cache is a folder; every array is a ``.npy`` file read with ``np.load(mmap_mode="r",
allow_pickle=False)``, so opening a cache costs nothing and a query only touches the rows it
needs::

    manifest.json                  format, version, model identity, codebooks, tokenizer, counts
    tokens.npy                     (n_tokens,) int32 token ids
    doc_ids.npy                    (n_tokens,) int32 row of the token's document in docs.jsonl
    offsets.npy                    (n_tokens, 2) int32 character start/end in the document text
    docs.jsonl                     one {"id", "label", "start", "end", "text"} per document;
                                   start/end is its token range
    vocab.json                     decoded string of every token id
    codes/<name>.npy               (n_tokens, [groups,] k) code ids, smallest unsigned dtype
    index/<name>.indptr.npy        (groups * num_codes + 1,) int64  } inverted index (CSR):
    index/<name>.positions.npy     (n_tokens * groups * k,) int32   } key = group * C + code
    vectors/<name>.npy             (groups, num_codes, head_dim) float32 code vectors

``index`` answers "where does code X fire" in O(hits): the sorted token positions of key
``g * C + c`` are ``positions[indptr[key]:indptr[key + 1]]``.

Documents are split into windows of ``seq_len`` tokens from the document start, each run
without earlier context; the same windows are used whenever activations are recomputed.
Everything is written into a temporary folder that is renamed into place at the end, so a
cache folder is either complete or absent.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .config import read_json, write_json_atomic

if TYPE_CHECKING:
    from .attach import CodebookModel

CACHE_FORMAT = "codebook-lens-cache"
CACHE_VERSION = 1
_INDEX_CHUNK = 1 << 22  # (token, group, k) entries sorted at once while building an index
_COPY_CHUNK = 1 << 26  # bytes copied at once when finishing an array


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
    """File stem under ``codes/``, ``index/`` and ``vectors/``."""

    @property
    def dtype(self) -> np.dtype[Any]:
        return code_dtype(self.num_codes)


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


# ------------------------------------------------------------------ identity
def model_identity(model: CodebookModel) -> dict[str, Any]:
    """What makes a model's codes comparable: its config, codebook names and code vectors."""
    base_cfg = getattr(model.base, "config", None)
    # Only the fields that decide which codes a token gets: new config fields with defaults
    # (training options, say) must not make every existing cache look foreign.
    code_fields = ("num_codes", "k", "similarity", "reduction", "layer_norm", "placements",
                   "layers", "modules")  # fmt: skip
    full = model.config.to_dict()
    cfg_json = json.dumps({f: full.get(f) for f in code_fields}, sort_keys=True)
    h = hashlib.sha256()
    for name, layer in model.codebooks.items():
        h.update(name.encode())
        h.update(layer.codebook.detach().float().cpu().numpy().tobytes())
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


# ------------------------------------------------------------------- writing
class _ArrayStream:
    """Append rows to a raw file; ``finish`` turns it into a ``.npy`` of the final length."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.rows = 0
        self._f = open(path.with_suffix(".raw"), "wb")  # noqa: SIM115 (closed in finish)

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.name}: rows of shape {arr.shape[1:]}, expected {self.row_shape}"
            )
        self._f.write(arr.tobytes())
        self.rows += arr.shape[0]

    def finish(self) -> None:
        self._f.close()
        raw = self.path.with_suffix(".raw")
        out = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=self.dtype, shape=(self.rows, *self.row_shape)
        )
        if self.rows:
            src = np.memmap(raw, dtype=self.dtype, mode="r", shape=out.shape)
            step = max(1, _COPY_CHUNK // max(1, out[0].nbytes))
            for s in range(0, self.rows, step):
                out[s : s + step] = src[s : s + step]
            del src
        out.flush()
        del out
        raw.unlink()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class CacheWriter:
    """Write a cache folder piece by piece; ``finish()`` builds the indices and renames it.

    Use as a context manager: an exception removes the temporary folder, leaving nothing.
    ``add_document`` then ``add_tokens`` for that document's tokens (any number of calls).
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
    ) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise ValueError(
                f"{self.out}: already exists; choose another --out or pass overwrite=True "
                "(--overwrite) to replace it"
            )
        if not codebooks:
            raise ValueError("codebooks=[] is invalid; a cache needs at least one codebook")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        for sub in ("codes", "index", "vectors"):
            (self.tmp / sub).mkdir(parents=True)
        taken: set[str] = set()
        for cb in codebooks:
            cb.file = _file_stem(cb.name, taken)
        self.codebooks = {cb.name: cb for cb in codebooks}
        self.identity, self.vocab, self.tokenizer = identity, vocab, tokenizer
        self.seq_len, self.extra = seq_len, dict(extra or {})
        self._tokens = _ArrayStream(self.tmp / "tokens.npy", np.int32, ())
        self._doc_ids = _ArrayStream(self.tmp / "doc_ids.npy", np.int32, ())
        self._offsets = _ArrayStream(self.tmp / "offsets.npy", np.int32, (2,))
        self._codes = {
            cb.name: _ArrayStream(
                self.tmp / "codes" / f"{cb.file}.npy",
                cb.dtype,
                (cb.groups, cb.k) if cb.grouped else (cb.k,),
            )
            for cb in codebooks
        }
        self._docs = open(self.tmp / "docs.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._doc: dict[str, Any] | None = None
        self.n_docs = 0
        for name, vec in (vectors or {}).items():
            cb = self.codebooks[name]
            vec = np.asarray(vec, dtype=np.float32)
            if vec.shape[:2] != (cb.groups, cb.num_codes):
                raise ValueError(
                    f"vectors[{name!r}] has shape {vec.shape}, expected "
                    f"({cb.groups}, {cb.num_codes}, head_dim)"
                )
            np.save(self.tmp / "vectors" / f"{cb.file}.npy", vec, allow_pickle=False)

    @property
    def n_tokens(self) -> int:
        return self._tokens.rows

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _end_doc(self) -> None:
        if self._doc is not None:
            self._doc["end"] = self.n_tokens
            doc = self._doc
            row = {k: doc[k] for k in ("id", "label", "start", "end", "text")}
            self._docs.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._doc = None

    def add_document(self, id: str, text: str, label: str | None = None) -> int:
        """Start a document; returns its row in ``docs.jsonl``."""
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
            codes: ``{name: (n, [groups,] k)}`` code ids for every codebook.
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

    def finish(self, progress: bool = False) -> CodeCache:
        """Close the arrays, build the inverted indices, write the manifest, rename."""
        from tqdm.auto import tqdm

        self._end_doc()
        self._docs.close()
        for s in (self._tokens, self._doc_ids, self._offsets, *self._codes.values()):
            s.finish()
        n = self.n_tokens
        for cb in tqdm(list(self.codebooks.values()), desc="index", disable=not progress):
            codes = np.load(self.tmp / "codes" / f"{cb.file}.npy", mmap_mode="r")
            build_index(
                codes.reshape(n, cb.groups, cb.k),
                cb.num_codes,
                self.tmp / "index" / f"{cb.file}.indptr.npy",
                self.tmp / "index" / f"{cb.file}.positions.npy",
            )
        write_json_atomic(self.tmp / "vocab.json", self.vocab)
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "identity": self.identity,
            "tokenizer": self.tokenizer,
            "n_tokens": n,
            "n_docs": self.n_docs,
            "seq_len": self.seq_len,
            "codebooks": [asdict(cb) for cb in self.codebooks.values()],
            "created": {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "codebook_lens": _version(),
                **self.extra,
            },
        }
        write_json_atomic(self.tmp / "manifest.json", manifest)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            self.out.rename(old)
        self.tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        return CodeCache(self.out)

    def abort(self) -> None:
        """Drop everything written so far."""
        for s in (self._tokens, self._doc_ids, self._offsets, *self._codes.values()):
            s.close()
        if not self._docs.closed:
            self._docs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _version() -> str:
    from . import __version__

    return __version__


def build_index(codes: np.ndarray, num_codes: int, indptr_path: Path, positions_path: Path) -> None:
    """Inverted index of ``codes`` ``(n, groups, k)``: key ``g * num_codes + c`` -> positions.

    Two passes over chunks (count, then place with a stable sort), so memory stays bounded
    whatever ``n``; positions of each key come out sorted.
    """
    n, groups, k = codes.shape
    n_keys = groups * num_codes
    offs = (np.arange(groups, dtype=np.int64) * num_codes)[None, :, None]
    rows = max(1, _INDEX_CHUNK // max(1, groups * k))
    counts = np.zeros(n_keys, dtype=np.int64)
    for s in range(0, n, rows):
        keys = (codes[s : s + rows].astype(np.int64) + offs).ravel()
        counts += np.bincount(keys, minlength=n_keys)
    indptr = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    pos_dtype = np.int32 if n < 2**31 else np.int64
    positions = np.lib.format.open_memmap(
        positions_path, mode="w+", dtype=pos_dtype, shape=(int(indptr[-1]),)
    )
    cursor = indptr[:-1].copy()
    for s in range(0, n, rows):
        chunk = codes[s : s + rows]
        keys = (chunk.astype(np.int64) + offs).ravel()
        pos = np.repeat(np.arange(s, s + len(chunk), dtype=pos_dtype), groups * k)
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        c = np.bincount(ks, minlength=n_keys)
        first = np.cumsum(c) - c  # where each key's run starts in ks
        dest = cursor[ks] + (np.arange(len(ks)) - first[ks])
        positions[dest] = pos[order]
        cursor += c
    positions.flush()
    del positions
    np.save(indptr_path, indptr, allow_pickle=False)


# ------------------------------------------------------------------- reading
class CodeCache:
    """A cache folder opened read-only (memory-mapped); cheap to open, safe to share.

    Derived arrays (document texts, global character offsets, token frequencies) are computed
    on first use and kept, so repeated queries (e.g. from the web app) stay fast.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{self.path}: no such cache folder (build one with "
                "`codebook-lens cache MODEL --data SRC --out DIR`)"
            )
        manifest = read_json(self.path / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{self.path}/manifest.json: not a codebook-lens cache "
                f"(field 'format' should be {CACHE_FORMAT!r})"
            )
        if manifest.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{self.path}/manifest.json: version {manifest.get('version')!r} "
                f"is not supported (this codebook-lens reads version "
                f"{CACHE_VERSION}); rebuild the cache"
            )
        self.manifest: dict[str, Any] = manifest
        self.n_tokens: int = int(manifest["n_tokens"])
        self.n_docs: int = int(manifest["n_docs"])
        self.seq_len: int = int(manifest.get("seq_len", 0))
        self.codebooks: dict[str, CodebookInfo] = {
            d["name"]: CodebookInfo(**d) for d in manifest["codebooks"]
        }
        self.tokens = self._load("tokens.npy")
        self.doc_ids = self._load("doc_ids.npy")
        self.offsets = self._load("offsets.npy")
        self._derived: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"CodeCache({str(self.path)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
            f"codebooks={list(self.codebooks)})"
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
    def info(self, codebook: str) -> CodebookInfo:
        """The codebook's description; ``ValueError`` naming the known ones if unknown."""
        if codebook not in self.codebooks:
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

    def codes(self, codebook: str) -> np.ndarray:
        """``(n_tokens, groups, k)`` code ids (a memory-mapped view; groups=1 if ungrouped)."""
        cb = self.info(codebook)
        arr = self._memo(f"codes:{codebook}", lambda: self._load(f"codes/{cb.file}.npy"))
        return arr.reshape(self.n_tokens, cb.groups, cb.k)

    def index(self, codebook: str) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, positions)`` of the codebook's inverted index (key = head * C + code)."""
        cb = self.info(codebook)
        return self._memo(
            f"index:{codebook}",
            lambda: (
                np.asarray(self._load(f"index/{cb.file}.indptr.npy")),
                self._load(f"index/{cb.file}.positions.npy"),
            ),
        )

    def positions(self, codebook: str, code: int, head: int | None = None) -> np.ndarray:
        """Sorted token positions where ``code`` (of ``head``) fires; O(hits)."""
        h = self.check_code(codebook, code, head)
        indptr, pos = self.index(codebook)
        key = h * self.info(codebook).num_codes + int(code)
        return np.asarray(pos[indptr[key] : indptr[key + 1]])

    def code_counts(self, codebook: str) -> np.ndarray:
        """``(groups, num_codes)`` number of tokens on which each code fires."""
        cb = self.info(codebook)
        indptr, _ = self.index(codebook)
        return np.diff(indptr).reshape(cb.groups, cb.num_codes)

    def vectors(self, codebook: str) -> np.ndarray | None:
        """``(groups, num_codes, head_dim)`` code vectors, or ``None`` if not stored."""
        rel = f"vectors/{self.info(codebook).file}.npy"
        if not (self.path / rel).exists():
            return None
        return self._memo(f"vec:{codebook}", lambda: self._load(rel))  # type: ignore[no-any-return]

    # --------------------------------------------------------------- text
    @property
    def docs(self) -> list[Doc]:
        """Every document (text and token range), read once."""

        def read() -> list[Doc]:
            p = self.path / "docs.jsonl"
            try:
                with open(p, encoding="utf-8") as f:
                    return [Doc(**json.loads(line)) for line in f if line.strip()]
            except FileNotFoundError:
                raise FileNotFoundError(f"{p}: missing from the cache (rebuild it)") from None

        return self._memo("docs", read)  # type: ignore[no-any-return]

    @property
    def vocab(self) -> list[str]:
        """Decoded string of every token id."""
        return self._memo("vocab", lambda: read_json(self.path / "vocab.json"))  # type: ignore[no-any-return]

    def token_str(self, token_id: int) -> str:
        v = self.vocab
        return v[token_id] if 0 <= token_id < len(v) else f"<{token_id}>"

    @property
    def doc_char_base(self) -> np.ndarray:
        """``(n_docs,)`` start of each document in the texts joined by ``\\x00``."""

        def make() -> np.ndarray:
            lens = np.array([len(d.text) + 1 for d in self.docs], dtype=np.int64)
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
        return self._memo(  # type: ignore[no-any-return]
            "tokfreq",
            lambda: np.bincount(np.asarray(self.tokens), minlength=len(self.vocab)),
        )

    def token_text(self, position: int) -> str:
        """The exact text of the token at ``position``."""
        doc = self.docs[int(self.doc_ids[position])]
        s, e = (int(x) for x in self.offsets[position])
        return doc.text[s:e]

    def windows(self, limit: int | None = None) -> Iterator[tuple[int, int]]:
        """Token ranges ``[start, end)`` run together when the cache was built."""
        limit = self.n_tokens if limit is None else min(limit, self.n_tokens)
        step = self.seq_len or self.n_tokens or 1
        for d in self.docs:
            for s in range(d.start, min(d.end, limit), step):
                yield s, min(s + step, d.end, limit)
            if d.end >= limit:
                return


def load_cache(path: str | os.PathLike[str]) -> CodeCache:
    """Open a cache folder (memory-mapped)."""
    return CodeCache(path)


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
) -> CodeCache:
    """Run ``model`` over ``documents`` and write a cache of at most ``max_tokens`` tokens.

    Args:
        model: a ``CodebookModel`` (its device is used; it is put in eval mode meanwhile).
        tokenizer: a Hugging Face *fast* tokenizer (character offsets come from it).
        documents: objects with ``.id``, ``.text`` and ``.label``.
        out: the cache folder (written to a temporary folder, renamed at the end).
        max_tokens: stop after this many tokens (the last document is cut).
        seq_len: window length; default the model's maximum positions (at most 1024).
        batch_size: windows per forward pass.
    """
    import torch
    from tqdm.auto import tqdm

    from .attach import eval_mode

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; it must be an integer >= 1")
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
    device = next(model.parameters()).device
    vectors = {
        name: layer.codebook.detach().float().cpu().numpy()
        for name, layer in model.codebooks.items()
    }
    infos = _codebook_infos(model)
    writer = CacheWriter(
        out,
        codebooks=infos,
        identity=model_identity(model),
        vocab=_vocab_strings(tokenizer),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        seq_len=seq_len,
        vectors=vectors,
        extra={"source": source, "max_tokens": max_tokens},
        overwrite=overwrite,
    )
    bar = tqdm(total=max_tokens, unit="tok", desc="cache", disable=not progress)
    # Documents and windows in reading order; replayed into the writer once a batch has run.
    queue: list[tuple[Any, ...]] = []
    windows: list[np.ndarray] = []

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
            host = {n: c.cpu().numpy() for n, c in codes.items()}
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

    with eval_mode(model):  # each module's own mode comes back afterwards
        try:
            with writer:
                total = 0
                for doc in documents:
                    if total >= max_tokens:
                        break
                    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
                    toks = np.asarray(enc["input_ids"], dtype=np.int32)[: max_tokens - total]
                    if not len(toks):
                        continue
                    offs = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
                    offs = offs[: len(toks)]
                    queue.append(("doc", doc.id, doc.text, getattr(doc, "label", None)))
                    for s in range(0, len(toks), seq_len):
                        queue.append(
                            ("win", len(windows), toks[s : s + seq_len], offs[s : s + seq_len])
                        )
                        windows.append(toks[s : s + seq_len])
                        if len(windows) >= batch_size:
                            flush()
                    total += len(toks)
                flush()
                if writer.n_tokens == 0:
                    raise ValueError(
                        f"documents from {source or 'the data'} gave no tokens; nothing to cache"
                    )
                bar.close()
                return writer.finish(progress=progress)
        finally:
            bar.close()


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
) -> CodeCache:
    """A cache of random English-like words and random codes, for tests and benchmarks.

    Codes are distinct within each token (and head). ``plant={"May": 7}`` makes code 7 of the
    first codebook (head 0) fire exactly on the word "May" and nowhere else (the other heads of
    that codebook never use planted ids). Codebooks are named
    ``layers.{i}.mlp_out`` (``layers.{i}.attn_heads`` with ``groups`` heads if ``groups > 1``).
    Token ``i`` is word ``i`` at a document start, token ``len(words) + i`` is " word".
    """
    from tqdm.auto import tqdm

    if k > num_codes - 1:
        raise ValueError(f"k={k} is invalid; it must be < num_codes={num_codes}")
    rng = np.random.default_rng(seed)
    words = list(_WORDS)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    probs = zipf / zipf.sum()
    vocab = words + [" " + w for w in words]
    placement = "attn_heads" if groups > 1 else "mlp_out"
    infos = [
        CodebookInfo(
            f"layers.{i}.{placement}", placement, i, groups, groups > 1, k, num_codes, 16 * groups
        )
        for i in range(n_codebooks)
    ]
    identity = {
        "base_model": "synthetic",
        "model_type": "synthetic",
        "vocab_size": len(vocab),
        "config_hash": f"seed{seed}",
        "codebook_hash": f"seed{seed}",
        "codebooks": [c.name for c in infos],
    }
    vectors = {
        c.name: rng.standard_normal((groups, num_codes, 16)).astype(np.float32) for c in infos
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
    with CacheWriter(
        out,
        codebooks=infos,
        identity=identity,
        vocab=vocab,
        tokenizer="words",
        seq_len=doc_tokens,
        vectors=vectors,
        overwrite=overwrite,
        extra={"source": "synthetic"},
    ) as writer:
        bar = tqdm(total=n_tokens, unit="tok", desc="synthetic", disable=not progress)
        done, d = 0, 0
        while done < n_tokens:
            n = min(doc_tokens, n_tokens - done)
            word_ids = rng.choice(len(words), size=n, p=probs)
            pieces = [words[w] if j == 0 else " " + words[w] for j, w in enumerate(word_ids)]
            lens = np.array([len(piece) for piece in pieces])
            ends = np.cumsum(lens)
            offsets = np.stack([ends - lens, ends], axis=1)
            offsets[1:, 0] += 1  # a token's leading space is not part of its word
            tokens = np.where(np.arange(n) == 0, word_ids, word_ids + len(words))
            codes = {}
            for ci, info in enumerate(infos):
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
                codes[info.name] = arr.astype(info.dtype)
            label = labels[d % len(labels)] if labels else None
            writer.add_document(f"doc{d}", "".join(pieces), label)
            writer.add_tokens(tokens, offsets, codes)
            done += n
            d += 1
            bar.update(n)
        bar.close()
        return writer.finish(progress=progress)
