"""Patterns: sets of token positions, from a regex over the texts, a token string or documents.

A token belongs to a regex pattern if its character span overlaps a match. Regex matching
holds the GIL, so a large cache's documents are split over worker processes (``codes.pool``);
the positions are exactly those of the serial path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import regex

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.pool import choose_workers, run_jobs

PatternKind = Literal["regex", "token", "docs"]

DEFAULT_REGEX_TIMEOUT = 2.0
"""Seconds a user regex may run per million tokens of the cache (at least this long) before
it is stopped: generous for any sane pattern, short for catastrophic backtracking."""
PARALLEL_MIN_TEXT_BYTES = 1 << 23
"""Bytes of document text from which a regex is split over processes by default."""
ROWS_CHUNK = 1 << 22
"""Code entries (or tokens) gathered at once: bounded memory for huge patterns."""
_BLOCK_TOKENS = 1 << 18  # tokens whose match spans are turned into positions at once
_WORKER_CACHES: dict[str, tuple[int, CodeCache]] = {}


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


def worker_cache(path: str) -> CodeCache:
    """The cache at ``path``, opened once per worker (reopened if it was rebuilt)."""
    stamp = os.stat(Path(path) / "manifest.json").st_mtime_ns
    got = _WORKER_CACHES.get(path)
    if got is None or got[0] != stamp:
        got = (stamp, CodeCache(path))
        _WORKER_CACHES[path] = got
    return got[1]


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
    n = choose_workers(workers, text_bytes, PARALLEL_MIN_TEXT_BYTES, cache.n_docs)
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
            found = run_jobs(_regex_job, jobs, n)
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
        _regex_positions(worker_cache(path), pattern, flags, a, b, deadline) + start
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
        np.flatnonzero(np.isin(np.asarray(cache.tokens[s : s + ROWS_CHUNK]), ids)) + s
        for s in range(0, cache.n_tokens, ROWS_CHUNK)
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
