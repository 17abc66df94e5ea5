"""Searches for the app, run where they can use every core.

A search (compile a user regex, run it over every document, rank the codes of every codebook
with ``search.search``) is CPU work, and regex matching holds Python's GIL, so searches in the
server's threads would share one core. ``SearchPool`` runs them in worker processes instead
(``codes.pool``, one per core by default, at a lower priority): each opens the cache itself (memory-mapped, so the pages are shared
through the OS) and warms it once, and the server only waits for the answer, so pages stay
responsive under load. With ``workers=0`` searches run in the calling thread (tests, notebooks).

Workers exchange only plain values with the server: a dict of strings and numbers in, a
``(status, text)`` pair out, where ``text`` is the JSON answer or the error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from typing import Any
from urllib.parse import urlencode

from codebook_lens.app.config import AppError
from codebook_lens.app.links import code_ref, with_query
from codebook_lens.codes.cache import load_cache
from codebook_lens.codes.pool import WorkerPool
from codebook_lens.codes.search import make_pattern, search

log = logging.getLogger("codebook_lens.app")

PATTERN_MEMO = 64
"""Patterns each searcher keeps (a page of results followed by the next page reuses one)."""

WORKER_NICENESS = 5
"""How much lower the workers' CPU priority is than the server's: under a burst of searches
the process serving pages still gets the CPU when it needs it (the workers use the rest)."""


class Searcher:
    """Searches over one open cache, with the last patterns memoised (one per process).

    ``library_workers`` goes to the library's own ``workers=`` (which can split one big search
    over processes): 1 in the pool's workers, whose parallelism is across requests, so that a
    burst of searches never starts processes inside processes; None (the library's choice) when
    searches run in the server process.
    """

    def __init__(
        self, cache: Any, regex_timeout: float, library_workers: int | None = None
    ) -> None:
        self.cache = cache
        self.regex_timeout = regex_timeout
        self.library_workers = library_workers
        self._patterns: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._labels: list[str] | None = None

    def labels(self) -> list[str]:
        """Document labels in the cache (the topics a search can use), sorted."""
        if self._labels is None:
            self._labels = sorted({str(d.label) for d in self.cache.docs if d.label is not None})
        return self._labels

    def pattern(self, kind: str, query: str) -> Any:
        """The library's ``Pattern`` for a query (``kind``: regex, token or topic)."""
        key = (kind, query)
        with self._lock:
            if key in self._patterns:
                self._patterns.move_to_end(key)
                return self._patterns[key]
        if kind == "regex":
            pat = make_pattern(
                self.cache, regex=query, timeout=self.regex_timeout, workers=self.library_workers
            )
        elif kind == "token":
            pat = make_pattern(self.cache, token=query)
        else:
            if query not in self.labels():
                raise AppError(
                    404,
                    f"topic {query!r} labels no document of this cache; topics: {self.labels()}",
                )
            pat = make_pattern(self.cache, docs_label=query)
        with self._lock:
            self._patterns[key] = pat
            while len(self._patterns) > PATTERN_MEMO:
                self._patterns.popitem(last=False)
        return pat

    def warm(self) -> None:
        """Touch what the first search would load (texts, spans, code counts, code pages)."""
        if self.cache.n_tokens:
            search(self.cache, self.pattern("regex", r"\A."), top=1, workers=self.library_workers)

    def search(self, p: dict[str, Any]) -> dict[str, Any]:
        """Codes ranked by agreement with a pattern, one ranked list per codebook.

        ``p`` holds the validated request (``schemas.SearchQuery``). ``page`` applies to every
        list; the library ranks ``page * per_page + 1`` codes so the next page's existence is
        known without ranking everything.
        """
        cache = self.cache
        codebook = p["codebook"] or None
        if codebook is not None and codebook not in cache.codebooks:
            raise AppError(
                404,
                f"codebook={codebook!r} is not in this cache; choose one of {list(cache.codebooks)}",
            )
        names = [codebook] if codebook else list(cache.codebooks)
        kind, query, sort = p["kind"], p["q"], p["sort"]
        page, per_page = p["page"], p["per_page"]
        pattern = self.pattern(kind, query)
        start, stop = (page - 1) * per_page, page * per_page
        filters = {k: p[k] for k in ("min_count", "min_precision", "min_recall")}
        sections = []
        for name in names:
            res = search(
                cache,
                pattern,
                codebooks=[name],
                top=stop + 1,
                sort_by=sort,
                workers=self.library_workers,
                **filters,
            )
            rows = []
            for m in res.matches[start:stop]:
                ref = code_ref(m.codebook, m.code, m.head)
                rows.append({**m.to_dict(), "label": ref["label"], "url": ref["url"]})
            more = with_query(
                "/search?" + urlencode({"kind": kind, "q": query}),
                codebook=name,
                sort=sort,
                **filters,
            )
            sections.append(
                {
                    "codebook": name,
                    "matches": rows,
                    "has_next": len(res.matches) > stop,
                    "more_url": more,
                }
            )
        return {
            "kind": kind,
            "query": query,
            "pattern_tokens": pattern.size,
            "n_tokens": cache.n_tokens,
            "sort_by": sort,
            "filters": {"codebook": codebook, **filters},
            "page": page,
            "per_page": per_page,
            "has_next": any(s["has_next"] for s in sections),
            "results": sections,
        }

    def answer(self, p: dict[str, Any]) -> tuple[int, str]:
        """``search`` as ``(200, JSON)`` or ``(status, message)``: what a worker sends back."""
        try:
            return 200, json.dumps(self.search(p))
        except AppError as e:
            return e.status, e.message
        except ValueError as e:  # the library's message for a regex that fails or times out
            return 400, str(e)


# ------------------------------------------------------------- worker side
_worker: Searcher | None = None


def init_worker(cache_dir: str, regex_timeout: float) -> None:
    """Set-up of each worker (``codes.pool``): open the cache and warm it."""
    global _worker
    _worker = Searcher(load_cache(cache_dir), regex_timeout, library_workers=1)
    _worker.warm()


def _answer(p: dict[str, Any]) -> tuple[int, str]:
    assert _worker is not None, "search worker was not initialised"
    return _worker.answer(p)


# ------------------------------------------------------------- server side
class SearchPool:
    """Searches in ``workers`` processes (0: in the calling thread), started on first use."""

    def __init__(self, cache: Any, regex_timeout: float, workers: int) -> None:
        self.local = Searcher(cache, regex_timeout)
        self.workers = workers
        self._pool = (
            WorkerPool(
                workers,
                setup=f"{__name__}:init_worker",
                setup_args=(str(cache.path), regex_timeout),
                niceness=WORKER_NICENESS,
            )
            if workers
            else None
        )

    def start(self) -> None:
        """Start every worker and wait until each has opened and warmed the cache."""
        if self._pool is not None:
            self._pool.start()

    async def search_json(self, p: dict[str, Any]) -> str:
        """The search answer as JSON text; errors raise ``AppError`` with the library's message."""
        if self._pool is None:
            from starlette.concurrency import run_in_threadpool

            status, text = await run_in_threadpool(self.local.answer, p)
        else:
            try:
                status, text = await asyncio.wrap_future(self._pool.submit(_answer, p))
            except BrokenProcessPool:
                log.error("a search worker stopped unexpectedly; restarting the pool")
                self.close()
                raise AppError(500, "a search worker stopped; the pool was restarted") from None
        if status != 200:
            raise AppError(status, text)
        return text

    async def search(self, p: dict[str, Any]) -> dict[str, Any]:
        """The search answer as a dict (for the HTML page)."""
        data: dict[str, Any] = json.loads(await self.search_json(p))
        return data

    def close(self) -> None:
        """Stop the workers and wait for them (the next search starts them again)."""
        if self._pool is not None:
            self._pool.close()
