"""Query a code cache: which codes fire on a pattern, and what a code fires on.

A *pattern* is a set of token positions, from a regex over the document texts (a token belongs
to the pattern if its character span overlaps a match), a token string, or a set of documents.
For a code and a pattern (METHOD.md section 3):

- precision = fraction of the code's firings that are on pattern tokens,
- recall = fraction of pattern tokens on which the code fires,
- f1 = their harmonic mean.

``search`` scores every code of every codebook (per head for grouped codebooks) at once: one
``bincount`` of the codes at pattern positions against the code totals stored in the cache,
so the cost is O(pattern tokens x k x heads + codes), never a loop over codes, and it needs
neither the inverted index nor more memory than a chunk of rows.

Large queries use the machine: the codebooks (and shards) of a search, and the documents of a
regex, are split over worker processes (``workers=``; by default as many as there are cores
once a query is big enough to gain from it). Regex matching and ``bincount`` hold the GIL, so
threads would not help. The results are exactly those of the serial path: integer counts,
summed.

Every result is a dataclass of plain Python values (``asdict`` gives JSON-ready dicts).
"""

from __future__ import annotations

import contextlib
import html
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import regex

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.direct_effect import PromotedToken, promoted_tokens
from codebook_lens.config import check_choice

PatternKind = Literal["regex", "token", "docs"]
SortKey = Literal["f1", "precision", "recall", "count"]
SORT_KEYS: tuple[str, ...] = ("f1", "precision", "recall", "count")

DEFAULT_REGEX_TIMEOUT = 2.0
"""Seconds a user regex may run per million tokens of the cache (at least this long) before
it is stopped: generous for any sane pattern, short for catastrophic backtracking."""
PARALLEL_MIN_ENTRIES = 1 << 25
"""Code entries (pattern tokens x heads x k, over all codebooks) from which a search is split
over processes when ``workers`` is not given; below it, starting work elsewhere costs more."""
PARALLEL_MIN_TEXT_BYTES = 1 << 23
"""Bytes of document text from which a regex is split over processes by default."""
_ROWS_CHUNK = 1 << 22  # code entries gathered at once
_BLOCK_TOKENS = 1 << 18  # tokens whose match spans are turned into positions at once


@dataclass
class Pattern:
    """A set of token positions, with where it came from."""

    kind: PatternKind
    """'regex', 'token' or 'docs'."""
    query: str
    """The regex, token string or document label."""
    positions: np.ndarray = field(repr=False)
    """Sorted unique token positions (int64)."""

    @property
    def size(self) -> int:
        return int(len(self.positions))


# -------------------------------------------------------------- worker pool
_POOL: tuple[int, Executor] | None = None
_BOOT = (
    "import sys, types\n"
    "if 'codebook_lens' not in sys.modules:\n"
    "    pkg = types.ModuleType('codebook_lens')\n"
    "    pkg.__path__ = [{path!r}]\n"
    "    sys.modules['codebook_lens'] = pkg\n"
)
_LAUNCH = threading.Lock()  # one thread at a time edits __main__ while workers start
_WORKER_CACHES: dict[str, tuple[int, CodeCache]] = {}


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _choose_workers(workers: int | None, work: float, threshold: float, units: int) -> int:
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} is invalid; it must be an integer >= 1 or None")
        return max(1, min(workers, units))
    # Inside a worker process of any pool, stay serial: pools do not nest well.
    if work < threshold or multiprocessing.parent_process() is not None:
        return 1
    return max(1, min(available_cores(), units))


def _pool(workers: int) -> Executor:
    """A process pool kept for the life of the process (so repeated queries start nothing)."""
    global _POOL
    if _POOL is not None and _POOL[0] >= workers:
        return _POOL[1]
    if _POOL is not None:
        _POOL[1].shutdown(wait=False, cancel_futures=True)
    methods = multiprocessing.get_all_start_methods()
    # forkserver: workers start from a clean process, not a copy of this one with its threads
    # (a web server, torch's thread pools) and locks.
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    # Workers import this module to run its jobs; its package's __init__ would import torch
    # and transformers (seconds and ~100 MB each) for nothing, so each worker first registers
    # the package as a bare namespace (a constant line run by exec before any job).
    boot = _BOOT.format(path=str(Path(__file__).resolve().parents[1]))
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=exec, initargs=(boot,))
    _POOL = (workers, pool)
    return pool


def _worker_cache(path: str) -> CodeCache:
    """The cache at ``path``, opened once per worker (reopened if it was rebuilt)."""
    stamp = os.stat(Path(path) / "manifest.json").st_mtime_ns
    got = _WORKER_CACHES.get(path)
    if got is None or got[0] != stamp:
        got = (stamp, CodeCache(path))
        _WORKER_CACHES[path] = got
    return got[1]


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Hide the caller's ``__main__`` while workers start.

    multiprocessing would import the caller's script in every worker, which re-runs a script
    without an ``if __name__ == "__main__"`` guard and fails for code read from stdin; the
    workers need nothing from it (their jobs are functions of this module).
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__.pop(k) for k in ("__file__",) if main and k in main.__dict__}
    spec = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            main.__spec__ = spec


def _run(jobs: list[tuple[Any, ...]], fn: Any, workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    pool = _pool(workers)
    with _LAUNCH, _main_hidden():  # submit() starts the workers it still needs
        futures = [pool.submit(fn, *job) for job in jobs]
    return [f.result() for f in futures]


# ------------------------------------------------------------------ patterns
def regex_pattern(
    cache: CodeCache,
    pattern: str,
    *,
    timeout: float | None = None,
    flags: int = 0,
    workers: int | None = None,
) -> Pattern:
    """Token positions whose character span overlaps a match of ``pattern``.

    Uses the ``regex`` package with a time limit over all documents together, so a pattern
    that backtracks catastrophically raises ``ValueError`` instead of hanging (``timeout``
    seconds; default ``regex_timeout(cache)``). Documents are
    read in blocks (memory: a block, not the cache) and, for a large cache, split over
    ``workers`` processes (default: one per core).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex={pattern!r} is invalid; give a non-empty regular expression")
    if timeout is None:
        timeout = regex_timeout(cache)
    try:
        regex.compile(pattern, flags)
    except regex.error as e:
        raise ValueError(f"regex={pattern!r} is invalid: {e}") from None
    text_bytes = sum(_text_bytes(p) for p in cache.parts)
    n = _choose_workers(workers, text_bytes, PARALLEL_MIN_TEXT_BYTES, cache.n_docs)
    # n contiguous document ranges of about equal text per shard, dealt into n jobs in order.
    ranges = [
        (str(part.path), int(start), a, b)
        for part, start in zip(cache.parts, cache.token_starts[:-1], strict=True)
        for a, b in _doc_cuts(part, n)
        if b > a
    ]
    per = max(1, -(-len(ranges) // n))
    jobs = [(ranges[j : j + per], pattern, flags, timeout) for j in range(0, len(ranges), per)]
    try:
        if n > 1:
            # Each job's clock starts when a worker takes it, so starting the workers (the
            # first time) does not eat into the regex's time.
            found = _run(jobs, _regex_job, n)
        else:  # serial: the caller's cache objects (their memoised documents, if any)
            parts = {str(p.path): p for p in cache.parts}
            deadline = time.monotonic() + timeout
            found = [
                _regex_positions(parts[path], pattern, flags, a, b, deadline) + start
                for path, start, a, b in ranges
            ]
    except TimeoutError:
        raise ValueError(
            f"regex={pattern!r} timed out after {timeout:g} s over {cache.n_docs} documents "
            "(probably catastrophic backtracking); simplify it, e.g. avoid nested quantifiers "
            "like (a+)+"
        ) from None
    positions = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return Pattern("regex", pattern, positions.astype(np.int64))


def regex_timeout(cache: CodeCache) -> float:
    """The default time limit of a regex over ``cache``: ``DEFAULT_REGEX_TIMEOUT`` seconds per
    million tokens, at least ``DEFAULT_REGEX_TIMEOUT``."""
    return DEFAULT_REGEX_TIMEOUT * max(1.0, cache.n_tokens / 1e6)


def _text_bytes(part: CodeCache) -> int:
    p = part.path / "docs.jsonl"
    return p.stat().st_size if p.is_file() else 0


def _doc_cuts(part: CodeCache, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous document ranges of ``part`` of about equal bytes of text."""
    if n <= 1 or part.n_docs <= 1:
        return [(0, part.n_docs)]
    index = part.path / "docs.index.npy"
    if index.is_file():
        byte = np.asarray(np.load(index, mmap_mode="r"), dtype=np.int64)
        edges = np.searchsorted(byte, np.linspace(0, byte[-1], n + 1), side="left")
    else:
        edges = np.linspace(0, part.n_docs, n + 1).round().astype(np.int64)
    edges = np.clip(edges, 0, part.n_docs)
    edges[0], edges[-1] = 0, part.n_docs
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _regex_job(
    ranges: list[tuple[str, int, int, int]], pattern: str, flags: int, timeout: float
) -> np.ndarray:
    """Global positions for ``(part path, its first token, doc from, doc to)`` ranges."""
    deadline = time.monotonic() + timeout
    out = [
        _regex_positions(_worker_cache(path), pattern, flags, a, b, deadline) + start
        for path, start, a, b in ranges
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _regex_positions(
    cache: CodeCache, pattern: str, flags: int, d0: int, d1: int, deadline: float
) -> np.ndarray:
    """Positions (local to ``cache``) of tokens overlapping a match in documents ``d0 .. d1``.

    Raises ``TimeoutError`` past ``deadline`` (``time.monotonic()``, shared by processes).
    """
    rx = regex.compile(pattern, flags)
    out: list[np.ndarray] = []
    block: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # doc start, end, len, spans
    for doc in cache.iter_docs(d0, d1):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        spans = [m.span() for m in rx.finditer(doc.text, timeout=left, concurrent=True)]
        block.append((doc.start, doc.end, len(doc.text), [s for s in spans if s[1] > s[0]]))
        if block[-1][1] - block[0][0] >= _BLOCK_TOKENS:
            out.append(_block_positions(cache, block))
            block = []
    if block:
        out.append(_block_positions(cache, block))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _block_positions(
    cache: CodeCache, block: list[tuple[int, int, int, list[tuple[int, int]]]]
) -> np.ndarray:
    """Tokens of consecutive documents overlapping any match span, in one vectorised pass."""
    t0, t1 = block[0][0], block[-1][1]
    if not any(spans for *_, spans in block) or t1 <= t0:
        return np.zeros(0, dtype=np.int64)
    # Block coordinates: documents laid end to end with one separator character between.
    lens = np.array([n_chars + 1 for _, _, n_chars, _ in block], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(lens)[:-1]])
    sizes = np.array([e - s for s, e, _, _ in block], dtype=np.int64)
    tok_base = np.repeat(base, sizes)
    off = np.asarray(cache.offsets[t0:t1], dtype=np.int64)
    # Keep both sorted for searchsorted (tokenizers emit monotonic offsets already).
    tok_s = np.maximum.accumulate(tok_base + off[:, 0])
    tok_e = np.maximum.accumulate(tok_base + off[:, 1])
    s = np.concatenate(
        [[b + a for a, _ in spans] for b, (*_, spans) in zip(base, block, strict=True)]
    )
    e = np.concatenate(
        [[b + z for _, z in spans] for b, (*_, spans) in zip(base, block, strict=True)]
    )
    # token i overlaps [s, e) iff tok_e[i] > s and tok_s[i] < e (both arrays are sorted)
    lo = np.searchsorted(tok_e, s.astype(np.int64), side="right")
    hi = np.searchsorted(tok_s, e.astype(np.int64), side="left")
    keep = hi > lo
    mark = np.zeros(t1 - t0 + 1, dtype=np.int64)
    np.add.at(mark, lo[keep], 1)
    np.add.at(mark, hi[keep], -1)
    return np.flatnonzero(np.cumsum(mark[:-1]) > 0) + t0


def token_pattern(cache: CodeCache, token: str) -> Pattern:
    """Positions of tokens whose decoded string equals ``token`` (surrounding spaces ignored)."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"token={token!r} is invalid; give a non-empty token string")
    want = token.strip()
    ids = np.asarray([i for i, s in enumerate(cache.vocab) if s.strip() == want])
    if not len(ids):
        return Pattern("token", token, np.zeros(0, dtype=np.int64))
    found = [
        np.flatnonzero(np.isin(np.asarray(cache.tokens[s : s + _ROWS_CHUNK]), ids)) + s
        for s in range(0, cache.n_tokens, _ROWS_CHUNK)
    ]
    return Pattern("token", token, np.concatenate(found).astype(np.int64))


def docs_pattern(cache: CodeCache, label: str) -> Pattern:
    """All token positions of the documents labelled ``label`` (e.g. a BBC topic)."""
    labels = cache.doc_labels
    picked = [i for i, lab in enumerate(labels) if lab == label]
    if not picked:
        names = sorted({str(lab) for lab in labels if lab is not None})
        raise ValueError(
            f"docs label={label!r} matches no document in this cache; labels: {names[:20]}"
        )
    ranges = cache.doc_ranges[picked]
    parts = [np.arange(s, e, dtype=np.int64) for s, e in ranges]
    return Pattern("docs", label, np.concatenate(parts))


def make_pattern(
    cache: CodeCache,
    *,
    regex: str | None = None,
    token: str | None = None,
    docs_label: str | None = None,
    timeout: float | None = None,
    workers: int | None = None,
) -> Pattern:
    """Exactly one of ``regex``, ``token`` or ``docs_label`` -> ``Pattern``."""
    given = [
        (k, v)
        for k, v in (("regex", regex), ("token", token), ("docs_label", docs_label))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one pattern: regex, token or docs_label (got {[k for k, _ in given]})"
        )
    if regex is not None:
        return regex_pattern(cache, regex, timeout=timeout, workers=workers)
    if token is not None:
        return token_pattern(cache, token)
    assert docs_label is not None
    return docs_pattern(cache, docs_label)


# -------------------------------------------------------------------- search
@dataclass
class CodeMatch:
    """One code's agreement with a pattern."""

    codebook: str
    code: int
    head: int | None
    """Head for grouped (attention-head) codebooks, else ``None``."""
    precision: float
    recall: float
    f1: float
    count: int
    """Tokens on which the code fires (in the whole cache)."""
    hits: int
    """Pattern tokens on which the code fires."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Codes ranked for a pattern, best first."""

    kind: str
    query: str
    pattern_tokens: int
    """Tokens in the pattern."""
    n_tokens: int
    """Tokens in the cache."""
    sort_by: str
    matches: list[CodeMatch]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(cache: CodeCache, positions: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(part index, positions local to it)]`` for the parts that hold any of them."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(cache.parts) == 1:
        return [(0, positions)]
    which = np.searchsorted(cache.token_starts, positions, side="right") - 1
    return [(int(i), positions[which == i] - cache.token_starts[i]) for i in np.unique(which)]


def _part_hits(part: CodeCache, codebook: str, positions: np.ndarray) -> np.ndarray:
    """``(groups * num_codes,)`` firings of every code on ``positions`` of one (unsharded) part."""
    cb = part.info(codebook)
    codes = part.codes(codebook)
    n_keys = cb.groups * cb.num_codes
    out = np.zeros(n_keys, dtype=np.int64)
    rows = max(1, _ROWS_CHUNK // (cb.groups * cb.k))  # bounded memory for huge patterns
    narrow = n_keys <= 1 << 16  # every key fits in 16 bits: one bincount over all heads
    offs = (np.arange(cb.groups, dtype=np.uint16) * cb.num_codes)[None, :, None] if narrow else None
    for s in range(0, len(positions), rows):
        sub = np.asarray(codes[positions[s : s + rows]])  # (m, G, k), the stored dtype
        if offs is not None:
            out += np.bincount((sub.astype(np.uint16, copy=False) + offs).ravel(), minlength=n_keys)
        else:  # wider keys: a bincount per head on the codes as stored (less memory traffic)
            for g in range(cb.groups):
                lo = g * cb.num_codes
                out[lo : lo + cb.num_codes] += np.bincount(
                    sub[:, g].ravel(), minlength=cb.num_codes
                )[: cb.num_codes]
    return out


def _hits_job(path: str, names: list[str], positions: np.ndarray) -> list[np.ndarray]:
    part = _worker_cache(path)
    return [_part_hits(part, name, positions) for name in names]


def code_hits(cache: CodeCache, codebook: str, positions: np.ndarray) -> np.ndarray:
    """``(groups, num_codes)`` firings of every code on ``positions``; one bincount per shard."""
    cb = cache.info(codebook)
    out = np.zeros(cb.groups * cb.num_codes, dtype=np.int64)
    for i, local in _split(cache, positions):
        out += _part_hits(cache.parts[i], codebook, local)
    return out.reshape(cb.groups, cb.num_codes)


def all_code_hits(
    cache: CodeCache, codebooks: Sequence[str], positions: np.ndarray, *, workers: int | None = None
) -> dict[str, np.ndarray]:
    """``code_hits`` for several codebooks, split over ``workers`` processes (default: one per
    core once the work is large, ``PARALLEL_MIN_ENTRIES``); the same integers either way."""
    names = list(codebooks)
    pieces = _split(cache, positions)
    work = len(positions) * sum(cache.info(n).groups * cache.info(n).k for n in names)
    n = _choose_workers(workers, work, PARALLEL_MIN_ENTRIES, len(names) * len(pieces))
    flat = {
        name: np.zeros(cache.info(name).groups * cache.info(name).num_codes, np.int64)
        for name in names
    }
    if n <= 1:
        for i, local in pieces:
            for name in names:
                flat[name] += _part_hits(cache.parts[i], name, local)
    else:
        # Per part, the codebooks in about n equal groups: every job sends its positions once.
        per = max(1, -(-n // max(1, len(pieces))))
        groups = [names[j::per] for j in range(min(per, len(names)))]
        jobs = [
            (
                str(cache.parts[i].path),
                group,
                local.astype(np.int32 if cache.parts[i].n_tokens < 2**31 else np.int64),
            )
            for i, local in pieces
            for group in groups
        ]
        for (_, group, _), res in zip(jobs, _run(jobs, _hits_job, n), strict=True):
            for name, h in zip(group, res, strict=True):
                flat[name] += h
    return {
        name: h.reshape(cache.info(name).groups, cache.info(name).num_codes)
        for name, h in flat.items()
    }


def search(
    cache: CodeCache,
    pattern: Pattern,
    *,
    codebooks: list[str] | None = None,
    min_count: int = 1,
    min_precision: float = 0.0,
    min_recall: float = 0.0,
    top: int | None = 50,
    sort_by: SortKey = "f1",
    workers: int | None = None,
) -> SearchResult:
    """Rank every code of ``codebooks`` (default all) by agreement with ``pattern``.

    Codes that never fire on the pattern are left out; ``min_count`` drops codes firing on
    fewer tokens in total; ``top`` keeps the best ``top`` over all codebooks (``None`` = all).
    Ties are broken by more hits, then codebook order, head and code id. ``workers``: processes
    to count in (``None``: one per core for a large query, else this process).
    """
    check_choice("sort_by", sort_by, SORT_KEYS)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count={min_count!r} is invalid; it must be an integer >= 0")
    for name, v in (("min_precision", min_precision), ("min_recall", min_recall)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v!r} is invalid; it must be in [0, 1]")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top={top!r} is invalid; it must be an integer >= 1 or None")
    names = list(cache.codebooks) if codebooks is None else list(codebooks)
    for n in names:
        cache.info(n)
    positions = np.asarray(pattern.positions, dtype=np.int64)
    n_pat = len(positions)
    if n_pat == 0:
        return SearchResult(pattern.kind, pattern.query, n_pat, cache.n_tokens, sort_by, [])
    all_hits = all_code_hits(cache, names, positions, workers=workers)

    def scores(hits: np.ndarray, count: np.ndarray) -> dict[str, np.ndarray]:
        h, c = hits.astype(np.float64), count.astype(np.float64)
        f1 = 2 * h / (c + n_pat)  # = 2PR / (P + R)
        return {"f1": f1, "precision": h / c, "recall": h / n_pat, "count": c}

    def best(primary: np.ndarray) -> np.ndarray:
        """Indices that can be in the top ``top`` by ``primary``: those at least as good as
        the top-th (all ties with it too, so the tie-breaks below stay exact)."""
        if top is None or len(primary) <= 4 * top:
            return np.arange(len(primary))
        kth = np.partition(primary, len(primary) - top)[len(primary) - top]
        return np.flatnonzero(primary >= kth)

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("cb", "head", "code", "hits", "count")}
    for ci, name in enumerate(names):
        cb = cache.info(name)
        hits = all_hits[name].ravel()
        count = cache.code_counts(name).ravel()
        keep = (hits > 0) & (count >= max(min_count, 1))
        if min_precision > 0:
            keep &= hits >= min_precision * count
        if min_recall > 0:
            keep &= hits >= min_recall * n_pat
        idx = np.flatnonzero(keep)
        # A big pattern makes most codes candidates; keep only those that can still rank.
        idx = idx[best(scores(hits[idx], count[idx])[sort_by])]
        cols["cb"].append(np.full(len(idx), ci))
        cols["head"].append(idx // cb.num_codes)
        cols["code"].append(idx % cb.num_codes)
        cols["hits"].append(hits[idx])
        cols["count"].append(count[idx])
    if not sum(len(a) for a in cols["cb"]):
        return SearchResult(pattern.kind, pattern.query, n_pat, cache.n_tokens, sort_by, [])
    arr = {k: np.concatenate(v) for k, v in cols.items()}
    score = scores(arr["hits"], arr["count"])
    prec, rec, f1, primary = score["precision"], score["recall"], score["f1"], score[sort_by]
    hits_f = arr["hits"].astype(np.float64)
    sel = best(primary)
    keys = (arr["code"][sel], arr["head"][sel], arr["cb"][sel], -hits_f[sel], -primary[sel])
    order = sel[np.lexsort(keys)]
    if top is not None:
        order = order[:top]
    matches = [
        CodeMatch(
            codebook=names[int(arr["cb"][i])],
            code=int(arr["code"][i]),
            head=int(arr["head"][i]) if cache.info(names[int(arr["cb"][i])]).grouped else None,
            precision=float(prec[i]),
            recall=float(rec[i]),
            f1=float(f1[i]),
            count=int(arr["count"][i]),
            hits=int(arr["hits"][i]),
        )
        for i in order
    ]
    return SearchResult(pattern.kind, pattern.query, n_pat, cache.n_tokens, sort_by, matches)


def search_pattern(
    cache: CodeCache,
    *,
    regex: str | None = None,
    token: str | None = None,
    docs_label: str | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> SearchResult:
    """``make_pattern`` then ``search`` (keyword arguments go to ``search``)."""
    pattern = make_pattern(
        cache,
        regex=regex,
        token=token,
        docs_label=docs_label,
        timeout=timeout,
        workers=kwargs.get("workers"),
    )
    return search(cache, pattern, **kwargs)


def search_loop(cache: CodeCache, pattern: Pattern, codebook: str) -> list[tuple[int, int, int]]:
    """Reference implementation: a plain loop over every code, scanning all tokens each time.

    Returns ``(head, code, hits)`` for codes with hits; for tests and the benchmark only.
    """
    cb = cache.info(codebook)
    codes = np.asarray(cache.codes(codebook))
    on_pattern = np.zeros(cache.n_tokens, dtype=bool)
    on_pattern[pattern.positions] = True
    out = []
    for h in range(cb.groups):
        for c in range(cb.num_codes):
            fires = (codes[:, h, :] == c).any(axis=1)
            hits = int((fires & on_pattern).sum())
            if hits:
                out.append((h, c, hits))
    return out


# ------------------------------------------------------------ reverse search
@dataclass
class TokenCount:
    """A token a code fires on."""

    token_id: int
    text: str
    count: int
    """Firings of the code on this token."""
    share: float
    """count / all firings of the code (precision of 'this token' for the code)."""
    coverage: float
    """count / occurrences of the token in the cache (recall of the code for the token)."""


@dataclass
class LabelCount:
    """Firings of a code inside documents of one label."""

    label: str | None
    count: int
    share: float
    """count / all firings of the code."""
    coverage: float
    """count / tokens in documents with this label."""


def code_tokens(
    cache: CodeCache, codebook: str, code: int, head: int | None = None, *, top: int = 20
) -> list[TokenCount]:
    """The tokens ``code`` fires on most (reverse search), most frequent first."""
    pos = cache.positions(codebook, code, head)
    if not len(pos):
        return []
    ids = np.asarray(cache.tokens)[pos]
    uniq, cnt = np.unique(ids, return_counts=True)
    order = np.lexsort((uniq, -cnt))[:top]
    freq = cache.token_frequencies
    return [
        TokenCount(
            token_id=int(uniq[i]),
            text=cache.token_str(int(uniq[i])),
            count=int(cnt[i]),
            share=float(cnt[i] / len(pos)),
            coverage=float(cnt[i] / max(1, int(freq[uniq[i]]))),
        )
        for i in order
    ]


def code_labels(
    cache: CodeCache, codebook: str, code: int, head: int | None = None
) -> list[LabelCount]:
    """How a code's firings spread over document labels (e.g. BBC topics), most first."""
    pos = cache.positions(codebook, code, head)
    docs = cache.docs
    labels = [d.label for d in docs]
    uniq = sorted({str(lab) for lab in labels})
    lab_idx = np.array([uniq.index(str(lab)) for lab in labels], dtype=np.int64)
    sizes = np.bincount(lab_idx, weights=[d.end - d.start for d in docs], minlength=len(uniq))
    fired = np.bincount(lab_idx[np.asarray(cache.doc_ids)[pos]], minlength=len(uniq))
    out = [
        LabelCount(
            label=None if uniq[j] == "None" else uniq[j],
            count=int(fired[j]),
            share=float(fired[j] / max(1, len(pos))),
            coverage=float(fired[j] / max(1.0, sizes[j])),
        )
        for j in range(len(uniq))
        if fired[j]
    ]
    return sorted(out, key=lambda x: -x.count)


# ------------------------------------------------------------------ contexts
@dataclass
class Context:
    """A token where a code fires, with text around it."""

    position: int
    doc: int
    """Row of the document in the cache."""
    doc_id: str
    label: str | None
    left: str
    token: str
    right: str
    rank: int
    """Slot of the code among the token's top-k (0 = best match)."""

    def render(self, style: Literal["brackets", "ansi", "html"] = "brackets") -> str:
        """One line with the firing token highlighted."""
        left, right = _oneline(self.left), _oneline(self.right)
        tok = _oneline(self.token)
        if style == "html":
            return f"{html.escape(left)}<mark>{html.escape(tok)}</mark>{html.escape(right)}"
        if style == "ansi":
            return f"{left}\x1b[1;30;43m{tok}\x1b[0m{right}"
        return f"{left}[[{tok}]]{right}"


def _oneline(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ").replace("\t", " ")


def code_contexts(
    cache: CodeCache,
    codebook: str,
    code: int,
    head: int | None = None,
    *,
    n: int = 20,
    window: int = 60,
) -> list[Context]:
    """Up to ``n`` contexts where ``code`` fires.

    The cache keeps code ranks, not scores, so "top activating" means: firings where the code
    is the token's best match (rank 0) first, then rank 1, ...; within a rank, contexts are
    spread evenly over the cache instead of all coming from its first document.
    """
    h = cache.check_code(codebook, code, head)
    pos = cache.positions(codebook, code, h)
    if not len(pos) or n <= 0:
        return []
    slots = np.asarray(cache.codes(codebook)[pos, h, :]) == code  # (m, k)
    rank = slots.argmax(axis=1)
    picked: list[int] = []
    for r in np.unique(rank):
        members = np.flatnonzero(rank == r)
        need = n - len(picked)
        if need <= 0:
            break
        if len(members) > need:
            members = members[np.linspace(0, len(members) - 1, need).round().astype(np.int64)]
        picked.extend(int(i) for i in members)
    docs = cache.docs
    out = []
    for i in picked:
        p = int(pos[i])
        d = int(cache.doc_ids[p])
        doc = docs[d]
        s, e = (int(x) for x in cache.offsets[p])
        out.append(
            Context(
                position=p,
                doc=d,
                doc_id=doc.id,
                label=doc.label,
                left=doc.text[max(0, s - window) : s],
                token=doc.text[s:e],
                right=doc.text[e : e + window],
                rank=int(rank[i]),
            )
        )
    return out


@dataclass
class TokenCodes:
    """One token of the cache and the codes that fire on it."""

    position: int
    text: str
    """The token's exact text in its document."""
    codes: dict[str, list[list[int]]]
    """``{codebook: [[codes of head 0], [head 1], ...]}`` (one inner list if ungrouped)."""


def token_codes(
    cache: CodeCache, start: int, end: int, codebooks: list[str] | None = None
) -> list[TokenCodes]:
    """Every token in positions ``[start, end)`` with its codes (for a text view)."""
    if not 0 <= start <= end <= cache.n_tokens:
        raise ValueError(
            f"token range [{start}, {end}) is invalid; it must lie in [0, {cache.n_tokens}]"
        )
    names = list(cache.codebooks) if codebooks is None else list(codebooks)
    rows = {n: np.asarray(cache.codes(n)[start:end]).tolist() for n in names}
    return [
        TokenCodes(p, cache.token_text(p), {n: rows[n][p - start] for n in names})
        for p in range(start, end)
    ]


# ------------------------------------------------------------------- profile
@dataclass
class SimilarCode:
    code: int
    cosine: float


@dataclass
class CodeProfile:
    """Everything about one code: how often, where, on what, and what it writes."""

    codebook: str
    code: int
    head: int | None
    num_codes: int
    count: int
    """Tokens on which the code fires."""
    frequency: float
    """count / tokens in the cache."""
    usage_rank: int
    """1 = the most used code of its codebook (head)."""
    contexts: list[Context]
    tokens: list[TokenCount]
    labels: list[LabelCount]
    similar: list[SimilarCode]
    """Codes of the same codebook (head) with the most similar vectors (cosine)."""
    promoted: list[PromotedToken] | None = None
    """Output tokens the code promotes most (needs the model), else ``None``."""
    promoted_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similar_codes(
    cache: CodeCache, codebook: str, code: int, head: int | None = None, *, top: int = 10
) -> list[SimilarCode]:
    """Codes of the same codebook and head whose vectors are closest by cosine."""
    h = cache.check_code(codebook, code, head)
    vec = cache.vectors(codebook)
    if vec is None:
        return []
    v = np.asarray(vec[h], dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cos = v @ v[code]
    cos[code] = -np.inf
    order = np.argsort(-cos, kind="stable")[: min(top, len(cos) - 1)]
    return [SimilarCode(int(i), float(cos[i])) for i in order]


def code_profile(
    cache: CodeCache,
    codebook: str,
    code: int,
    head: int | None = None,
    *,
    model: Any = None,
    n_contexts: int = 20,
    window: int = 60,
    n_tokens: int = 20,
    n_similar: int = 10,
    n_promoted: int = 20,
) -> CodeProfile:
    """Frequency, contexts, tokens, labels, similar codes and (with ``model``) promoted tokens."""
    h = cache.check_code(codebook, code, head)
    cb = cache.info(codebook)
    counts = cache.code_counts(codebook)[h]
    count = int(counts[code])
    promoted, note = None, ""
    if model is not None:
        promoted, note = promoted_tokens(model, cache, codebook, code, h, top=n_promoted)
    return CodeProfile(
        codebook=codebook,
        code=int(code),
        head=h if cb.grouped else None,
        num_codes=cb.num_codes,
        count=count,
        frequency=count / max(1, cache.n_tokens),
        usage_rank=int((counts > count).sum()) + 1,
        contexts=code_contexts(cache, codebook, code, h, n=n_contexts, window=window),
        tokens=code_tokens(cache, codebook, code, h, top=n_tokens),
        labels=code_labels(cache, codebook, code, h),
        similar=similar_codes(cache, codebook, code, h, top=n_similar),
        promoted=promoted,
        promoted_note=note,
    )


# ------------------------------------------------------------------ display
def format_matches(result: SearchResult) -> str:
    """A readable table of search results."""
    head = (
        f"{result.kind} {result.query!r}: {result.pattern_tokens} of {result.n_tokens} "
        f"tokens; best by {result.sort_by}"
    )
    if not result.matches:
        return head + "\n(no code fires on the pattern)"
    rows = [("codebook", "head", "code", "precision", "recall", "f1", "hits", "count")]
    for m in result.matches:
        rows.append(
            (
                m.codebook,
                "-" if m.head is None else str(m.head),
                str(m.code),
                f"{m.precision:.3f}",
                f"{m.recall:.3f}",
                f"{m.f1:.3f}",
                str(m.hits),
                str(m.count),
            )
        )
    return head + "\n" + _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_profile(p: CodeProfile, *, color: bool = False) -> str:
    """The profile as terminal text (``color`` highlights with ANSI, else ``[[token]]``)."""
    where = p.codebook + (f" head {p.head}" if p.head is not None else "")
    out = [
        f"code {p.code} of {where} (num_codes={p.num_codes})",
        f"fires on {p.count} tokens ({p.frequency:.4%}); usage rank {p.usage_rank}",
        "",
    ]
    out.append("contexts:")
    style: Literal["ansi", "brackets"] = "ansi" if color else "brackets"
    out += [f"  {c.render(style)}" for c in p.contexts] or ["  (never fires)"]
    if p.tokens:
        out += ["", "tokens:"]
        out.append(
            _table(
                [("token", "count", "share", "coverage")]
                + [
                    (repr(t.text), str(t.count), f"{t.share:.3f}", f"{t.coverage:.3f}")
                    for t in p.tokens
                ]
            )
        )
    if p.labels and any(lab.label is not None for lab in p.labels):
        out += ["", "document labels:"]
        out.append(
            _table(
                [("label", "count", "share", "coverage")]
                + [
                    (str(lab.label), str(lab.count), f"{lab.share:.3f}", f"{lab.coverage:.4f}")
                    for lab in p.labels
                ]
            )
        )
    if p.similar:
        out += ["", "similar codes: " + ", ".join(f"{s.code} ({s.cosine:.2f})" for s in p.similar)]
    if p.promoted is not None:
        out += [
            "",
            "promoted tokens: " + ", ".join(f"{t.text!r} ({t.logit:+.2f})" for t in p.promoted),
        ]
    if p.promoted_note:
        out.append(f"  ({p.promoted_note})")
    return "\n".join(out)


def profile_html(p: CodeProfile) -> str:
    """A standalone HTML page for the profile; the firing token is in ``<mark>``."""
    e = html.escape
    where = p.codebook + (f" head {p.head}" if p.head is not None else "")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>code {p.code} of {e(where)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "li{font-family:monospace;white-space:pre-wrap}mark{background:#fd0}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}</style>",
        "</head><body>",
        f"<h1>code {p.code} of {e(where)}</h1>",
        f"<p>fires on {p.count} tokens ({p.frequency:.4%}); usage rank {p.usage_rank} "
        f"of {p.num_codes}</p><h2>contexts</h2><ul>",
        *[f"<li>{c.render('html')}</li>" for c in p.contexts],
        "</ul><h2>tokens</h2><table><tr><th>token</th><th>count</th><th>share</th>"
        "<th>coverage</th></tr>",
        *[
            f"<tr><td>{e(repr(t.text))}</td><td>{t.count}</td><td>{t.share:.3f}</td>"
            f"<td>{t.coverage:.3f}</td></tr>"
            for t in p.tokens
        ],
        "</table>",
    ]
    if p.similar:
        parts.append(
            "<h2>similar codes</h2><p>"
            + ", ".join(f"{s.code} ({s.cosine:.2f})" for s in p.similar)
            + "</p>"
        )
    if p.promoted is not None:
        parts.append(
            "<h2>promoted tokens</h2><p>"
            + ", ".join(f"{e(repr(t.text))} ({t.logit:+.2f})" for t in p.promoted)
            + "</p>"
        )
        if p.promoted_note:
            parts.append(f"<p><small>{e(p.promoted_note)}</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def save_html(page: str, path: str | os.PathLike[str]) -> Path:
    """Write an HTML page atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
