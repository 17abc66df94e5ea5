"""Ranking codes against a pattern: hits per code, precision / recall / F1, ``search``.

For a code and a pattern (METHOD.md section 3):

- precision = fraction of the code's firings that are on pattern tokens,
- recall = fraction of pattern tokens on which the code fires,
- f1 = their harmonic mean.

``search`` scores every code of every codebook (per head for grouped codebooks) at once: one
count of the codes at pattern positions (``counting.count_codes``) against the code totals
stored in the cache, so the cost is O(pattern tokens x k x heads + codes), never a loop over codes, and it needs
neither the inverted index nor more memory than a chunk of rows. A large query's codebooks
(and shards) are split over worker processes; the counts are integers, summed, so the results
are exactly those of the serial path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.pool import choose_workers, run_jobs
from codebook_lens.codes.search.counting import count_codes
from codebook_lens.codes.search.patterns import Pattern, make_pattern, worker_cache
from codebook_lens.config import check_choice

SortKey = Literal["f1", "precision", "recall", "count"]
SORT_KEYS: tuple[str, ...] = ("f1", "precision", "recall", "count")
PARALLEL_MIN_ENTRIES = 1 << 25
"""Code entries (pattern tokens x heads x k, over all codebooks) from which a search is split
over processes when ``workers`` is not given; below it, starting work elsewhere costs more."""


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
    return count_codes(part.codes(codebook), positions, part.info(codebook).num_codes).ravel()


def _hits_job(path: str, names: list[str], positions: np.ndarray) -> list[np.ndarray]:
    part = worker_cache(path)
    return [_part_hits(part, name, positions) for name in names]


def code_hits(cache: CodeCache, codebook: str, positions: np.ndarray) -> np.ndarray:
    """``(groups, num_codes)`` firings of every code on ``positions``; one count per shard."""
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
    n = choose_workers(workers, work, PARALLEL_MIN_ENTRIES, len(names) * len(pieces))
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
        for (_, group, _), res in zip(jobs, run_jobs(_hits_job, jobs, n), strict=True):
            for name, h in zip(group, res, strict=True):
                flat[name] += h
    return {
        name: h.reshape(cache.info(name).groups, cache.info(name).num_codes)
        for name, h in flat.items()
    }


def _check_search_args(
    sort_by: str, min_count: int, min_precision: float, min_recall: float, top: int | None
) -> None:
    check_choice("sort_by", sort_by, SORT_KEYS)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count={min_count!r} is invalid; it must be an integer >= 0")
    for name, v in (("min_precision", min_precision), ("min_recall", min_recall)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v!r} is invalid; it must be in [0, 1]")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top={top!r} is invalid; it must be an integer >= 1 or None")


def _scores(hits: np.ndarray, count: np.ndarray, n_pat: int) -> dict[str, np.ndarray]:
    h, c = hits.astype(np.float64), count.astype(np.float64)
    f1 = 2 * h / (c + n_pat)  # = 2PR / (P + R)
    return {"f1": f1, "precision": h / c, "recall": h / n_pat, "count": c}


def _can_rank(primary: np.ndarray, top: int | None) -> np.ndarray:
    """Indices that can be in the top ``top`` by ``primary``: those at least as good as the
    top-th (all ties with it too, so the tie-breaks stay exact)."""
    if top is None or len(primary) <= 4 * top:
        return np.arange(len(primary))
    kth = np.partition(primary, len(primary) - top)[len(primary) - top]
    return np.flatnonzero(primary >= kth)


def _candidates(
    cache: CodeCache,
    names: list[str],
    all_hits: dict[str, np.ndarray],
    n_pat: int,
    *,
    min_count: int,
    min_precision: float,
    min_recall: float,
    top: int | None,
    sort_by: str,
) -> dict[str, np.ndarray]:
    """Columns ``cb, head, code, hits, count`` of the codes that pass the filters and can
    still rank (a big pattern makes most codes candidates)."""
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
        idx = idx[_can_rank(_scores(hits[idx], count[idx], n_pat)[sort_by], top)]
        cols["cb"].append(np.full(len(idx), ci))
        cols["head"].append(idx // cb.num_codes)
        cols["code"].append(idx % cb.num_codes)
        cols["hits"].append(hits[idx])
        cols["count"].append(count[idx])
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}


def _ranked(
    cache: CodeCache,
    names: list[str],
    arr: dict[str, np.ndarray],
    n_pat: int,
    *,
    top: int | None,
    sort_by: str,
) -> list[CodeMatch]:
    """The candidates best first: by ``sort_by``, then more hits, then codebook order, head
    and code id; the first ``top``."""
    score = _scores(arr["hits"], arr["count"], n_pat)
    prec, rec, f1, primary = score["precision"], score["recall"], score["f1"], score[sort_by]
    hits_f = arr["hits"].astype(np.float64)
    sel = _can_rank(primary, top)
    keys = (arr["code"][sel], arr["head"][sel], arr["cb"][sel], -hits_f[sel], -primary[sel])
    order = sel[np.lexsort(keys)]
    if top is not None:
        order = order[:top]
    return [
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
    _check_search_args(sort_by, min_count, min_precision, min_recall, top)
    names = list(cache.codebooks) if codebooks is None else list(codebooks)
    for n in names:
        cache.info(n)
    positions = np.asarray(pattern.positions, dtype=np.int64)
    n_pat = len(positions)
    matches: list[CodeMatch] = []
    if n_pat:
        all_hits = all_code_hits(cache, names, positions, workers=workers)
        arr = _candidates(
            cache,
            names,
            all_hits,
            n_pat,
            min_count=min_count,
            min_precision=min_precision,
            min_recall=min_recall,
            top=top,
            sort_by=sort_by,
        )
        if len(arr["cb"]):
            matches = _ranked(cache, names, arr, n_pat, top=top, sort_by=sort_by)
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
