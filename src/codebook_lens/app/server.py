"""A local web browser over a code cache (and, optionally, its model).

Every page is rendered from the same JSON the ``/api/...`` routes return, and every number in
that JSON comes from the library (``cache``, ``search``, ``intervene``); this module only
validates input, paginates, links and renders. Pages:

- ``/`` overview: model, cache size, codebook health (usage histograms, dead codes, entropy)
- ``/search`` regex / token / topic -> ranked codes per codebook (precision, recall, counts)
- ``/code/{codebook}/{code}?head=`` profile: contexts with the firing token highlighted,
  frequency, tokens it fires on, similar codes, promoted tokens
- ``/text`` a cached document (or pasted text, with a model): every token with its codes
- ``/steer`` (with a model) prompt + codes -> steered and unsteered samples side by side

Safety: the server binds 127.0.0.1 by default and only answers requests addressed to the host
it serves (no DNS rebinding); it reads files only from its cache (through ``CodeCache``) and
its packaged static folder; user regexes run with the search module's time limit; every input
is range-checked; errors are short messages (HTML or JSON), never a stack trace.
"""

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import check_range

log = logging.getLogger("codebook_lens.app")

HERE = Path(__file__).resolve().parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_CODE_REFS = 100_000
"""Most (token, code) pairs one text page lists (a page of a big model's codes is heavy)."""


@dataclass
class AppConfig:
    """Settings of ``codebook-lens serve`` (the CLI flags)."""

    cache_dir: str
    """Code cache folder written by ``codebook-lens cache``."""

    model_dir: str | None = None
    """Saved codebook model (enables pasted text and steering); must match the cache."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but loopback exposes the app to the network."""

    port: int = 8000
    """TCP port (0 picks a free one)."""

    regex_timeout: float = 2.0
    """Seconds a user regex may run before the search is stopped."""

    page_size: int = 25
    """Default rows per page."""

    max_page_size: int = 200
    """Largest rows-per-page a request may ask for."""

    max_query_chars: int = 500
    """Longest regex / token / topic query accepted."""

    max_text_chars: int = 20_000
    """Longest pasted text accepted (it is also cut to the model's context length)."""

    max_prompt_chars: int = 2_000
    """Longest steering prompt accepted."""

    max_new_tokens: int = 200
    """Most tokens one steering request may generate per sample."""

    max_samples: int = 8
    """Most samples one steering request may ask for."""

    def __post_init__(self) -> None:
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"cache_dir={self.cache_dir!r} is invalid; give a cache folder")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port={self.port!r} is invalid; it must be an integer")
        check_range("port", self.port, 0, 65535)
        check_range("regex_timeout", self.regex_timeout, 0.0, 60.0, low_open=True)
        for name in (
            "page_size",
            "max_page_size",
            "max_query_chars",
            "max_text_chars",
            "max_prompt_chars",
            "max_new_tokens",
            "max_samples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        if self.page_size > self.max_page_size:
            raise ValueError(
                f"page_size={self.page_size} is invalid; it must be <= "
                f"max_page_size={self.max_page_size}"
            )


class AppError(Exception):
    """An error shown to the user as it is: an HTTP status and one clear message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------- helpers
def paginate(total: int, page: int, per_page: int) -> dict[str, Any]:
    """Page bookkeeping: ``{page, per_page, total, pages, start, stop}`` (rows ``start:stop``).

    A page past the end is an error (404), so a stale link says so instead of showing nothing.
    """
    pages = max(1, math.ceil(total / per_page))
    if page > pages:
        raise AppError(404, f"page={page} is past the end; there are {pages} page(s)")
    start = (page - 1) * per_page
    return {
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": pages,
        "start": start,
        "stop": min(start + per_page, total),
    }


def with_query(url: str, **params: Any) -> str:
    """``url`` with query parameters replaced (``None`` removes one)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    for k, v in params.items():
        if v is None:
            query.pop(k, None)
        else:
            query[k] = str(v)
    return parts.path + ("?" + urlencode(query) if query else "")


def _token_text(text: str, start: int, end: int, prev_end: int) -> dict[str, str]:
    """How a token reads in running text: the gap before it and its own characters.

    Byte-level tokenizers split one character over several tokens that all report the same
    character span; only the first shows it, so the text reads exactly once. ``raw`` is the
    token's whole span.
    """
    return {
        "gap": text[prev_end:start] if start > prev_end else "",
        "text": text[max(start, prev_end) : end],
        "raw": text[start:end],
    }


def _quoted(text: str) -> str:
    """A token shown with its spaces visible: JSON-quoted, non-ASCII kept (escaped later)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _validation_message(exc: RequestValidationError) -> str:
    """One line per bad input: where it is, what was wrong (no echo of huge values)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
        where = ".".join(loc) or "request"
        lines.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(lines) or "invalid request"


def code_url(codebook: str, code: int, head: int | None = None) -> str:
    """Link to a code's page (``?head=`` for per-head codebooks)."""
    url = f"/code/{quote(codebook, safe='')}/{int(code)}"
    return url if head is None else f"{url}?head={int(head)}"


def code_label(codebook: str, code: int, head: int | None = None) -> str:
    """Short name of a code, e.g. ``layers.0.attn_heads h2 #12``."""
    return f"{codebook}{'' if head is None else f' h{head}'} #{code}"


def code_ref(codebook: str, code: int, head: int | None = None) -> dict[str, Any]:
    """A code as JSON: ``{codebook, head, code, label, short, url}``."""
    return {
        "codebook": codebook,
        "head": head,
        "code": int(code),
        "label": code_label(codebook, code, head),
        "short": f"{'' if head is None else f'h{head} '}#{code}",
        "url": code_url(codebook, code, head),
    }


# ------------------------------------------------------------------- state
class Lens:
    """What one server serves: a cache, optionally its model and tokenizer.

    Model forward passes (steering, pasted text, promoted tokens) run one at a time under
    ``model_lock``: interventions are installed on the model's layers, so two requests must
    never overlap. Cache queries need no lock (the cache is read-only and memory-mapped).
    """

    def __init__(
        self, config: AppConfig, *, cache: Any = None, model: Any = None, tokenizer: Any = None
    ) -> None:
        from ..cache import check_identity, load_cache

        self.config = config
        self.cache = load_cache(config.cache_dir) if cache is None else cache
        if model is None and config.model_dir is not None:
            from ..intervene import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(config.model_dir)
        if model is not None:
            check_identity(self.cache, model)
        self.model = model
        self.tokenizer = tokenizer
        self.model_lock = threading.Lock()
        self._plots_lock = threading.Lock()
        self._plots: dict[str, Path] | None = None
        self._plot_dir: Any = None
        self._patterns: dict[tuple[str, str], Any] = {}
        self._patterns_lock = threading.Lock()

    @property
    def can_steer(self) -> bool:
        return self.model is not None

    def close(self) -> None:
        if self._plot_dir is not None:
            self._plot_dir.cleanup()
            self._plot_dir = None

    # ---------------------------------------------------------- patterns
    def pattern(self, kind: str, query: str) -> Any:
        """The library's ``Pattern`` for a query, memoised (the last 64 queries)."""
        from ..search import make_pattern

        key = (kind, query)
        with self._patterns_lock:
            if key in self._patterns:
                return self._patterns[key]
        if kind == "regex":
            pat = make_pattern(self.cache, regex=query, timeout=self.config.regex_timeout)
        elif kind == "token":
            pat = make_pattern(self.cache, token=query)
        else:
            pat = make_pattern(self.cache, docs_label=query)
        with self._patterns_lock:
            self._patterns[key] = pat
            while len(self._patterns) > 64:
                self._patterns.pop(next(iter(self._patterns)))
        return pat

    # ------------------------------------------------------------- plots
    def plot(self, name: str) -> Path:
        """A health plot by name (``summary`` or a codebook); made once, kept in a temp dir."""
        import tempfile

        from ..analysis import plot_health

        with self._plots_lock:
            if self._plots is None:
                self._plot_dir = tempfile.TemporaryDirectory(prefix="codebook-lens-plots-")
                paths = plot_health(self.cache, self._plot_dir.name)
                names = [*self.cache.codebooks, "summary"]
                self._plots = dict(zip(names, paths, strict=True))
        if name not in self._plots:
            raise AppError(404, f"no plot named {name!r}; plots: {list(self._plots)}")
        return self._plots[name]

    # ------------------------------------------------------------- codes
    def check_code(self, codebook: str, code: int, head: int | None) -> int | None:
        """Validate a code address; unknown ones are 404s. Returns the head (None if ungrouped)."""
        try:
            h = self.cache.check_code(codebook, code, head)
        except ValueError as e:
            raise AppError(404, str(e)) from None
        return h if self.cache.info(codebook).grouped else None

    def token_codes(self, codebook: str | None, rows: Any) -> list[list[dict[str, Any]]]:
        """Per token, the code refs of ``codebook`` (``None`` = every codebook).

        ``rows`` maps a codebook name to its ``(n, groups, k)`` codes for the tokens shown.
        """
        names = list(rows) if codebook is None else [codebook]
        n = len(next(iter(rows.values()))) if rows else 0
        out: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for name in names:
            grouped = self.cache.info(name).grouped
            arr = rows[name].tolist()
            for i in range(n):
                for h, ks in enumerate(arr[i]):
                    for c in ks:
                        out[i].append(code_ref(name, c, h if grouped else None))
        return out

    # ------------------------------------------------------- page data
    def overview(self) -> dict[str, Any]:
        """Model, cache and per-codebook health (usage, dead codes, entropy) as JSON."""
        from ..analysis import codebook_health

        cache = self.cache
        m = cache.manifest
        created = m.get("created", {}) if isinstance(m.get("created"), dict) else {}
        codebooks = []
        for h in codebook_health(cache):
            info = cache.info(h.codebook)
            codebooks.append(
                {
                    **h.to_dict(),
                    "layer": info.layer,
                    "dim": info.dim,
                    "grouped": info.grouped,
                    "plot_url": f"/plots/{quote(h.codebook, safe='')}.png",
                }
            )
        return {
            "cache": {
                "name": cache.path.name,
                "n_tokens": cache.n_tokens,
                "n_docs": cache.n_docs,
                "seq_len": cache.seq_len,
                "tokenizer": m.get("tokenizer", ""),
                "created": created,
            },
            "model": {
                **{k: v for k, v in m.get("identity", {}).items() if k != "codebooks"},
                "loaded": self.model is not None,
            },
            "labels": self.labels(),
            "codebooks": codebooks,
            "summary_plot_url": "/plots/summary.png",
            "steer": self.can_steer,
        }

    def labels(self) -> list[str]:
        """Document labels in the cache (the topics a search can use)."""
        return sorted({str(d.label) for d in self.cache.docs if d.label is not None})

    def search(
        self,
        kind: str,
        query: str,
        *,
        codebook: str | None,
        sort: str,
        min_count: int,
        min_precision: float,
        min_recall: float,
        page: int,
        per_page: int,
    ) -> dict[str, Any]:
        """Codes ranked by agreement with a pattern, one ranked list per codebook.

        ``page`` applies to every list; the library ranks ``page * per_page + 1`` codes so the
        next page's existence is known without ranking everything.
        """
        from ..search import search

        names = [codebook] if codebook else list(self.cache.codebooks)
        for name in names:
            self.cache.info(name)
        pattern = self.pattern(kind, query)
        start, stop = (page - 1) * per_page, page * per_page
        sections = []
        for name in names:
            res = search(
                self.cache,
                pattern,
                codebooks=[name],
                min_count=min_count,
                min_precision=min_precision,
                min_recall=min_recall,
                top=stop + 1,
                sort_by=sort,  # type: ignore[arg-type]
            )
            rows = [
                {
                    **m.to_dict(),
                    **{
                        k: v
                        for k, v in code_ref(m.codebook, m.code, m.head).items()
                        if k in ("label", "url")
                    },
                }
                for m in res.matches[start:stop]
            ]
            sections.append(
                {
                    "codebook": name,
                    "matches": rows,
                    "has_next": len(res.matches) > stop,
                    "more_url": with_query(
                        "/search?" + urlencode({"kind": kind, "q": query}),
                        codebook=name,
                        sort=sort,
                        min_count=min_count,
                        min_precision=min_precision,
                        min_recall=min_recall,
                    ),
                }
            )
        return {
            "kind": kind,
            "query": query,
            "pattern_tokens": pattern.size,
            "n_tokens": self.cache.n_tokens,
            "sort_by": sort,
            "filters": {
                "codebook": codebook,
                "min_count": min_count,
                "min_precision": min_precision,
                "min_recall": min_recall,
            },
            "page": page,
            "per_page": per_page,
            "has_next": any(s["has_next"] for s in sections),
            "results": sections,
        }

    def code(
        self, codebook: str, code: int, head: int | None, *, n_contexts: int, window: int
    ) -> dict[str, Any]:
        """The library's code profile, with links to documents, similar codes and steering."""
        from ..search import code_profile

        h = self.check_code(codebook, code, head)
        if self.model is not None:
            with self.model_lock:
                prof = code_profile(
                    self.cache,
                    codebook,
                    code,
                    h,
                    model=self.model,
                    n_contexts=n_contexts,
                    window=window,
                )
        else:
            prof = code_profile(self.cache, codebook, code, h, n_contexts=n_contexts, window=window)
        data = prof.to_dict()
        for ctx in data["contexts"]:
            ctx["doc_url"] = f"/text?doc={ctx['doc']}&pos={ctx['position']}"
        data["similar"] = [{**s, **code_ref(codebook, s["code"], h)} for s in data["similar"]]
        data["ref"] = code_ref(codebook, code, h)
        data["n_tokens"] = self.cache.n_tokens
        data["steer_url"] = "/steer?" + urlencode(
            {"codebook": codebook, "codes": code, **({} if h is None else {"head": h})}
        )
        data["more_contexts_url"] = with_query(code_url(codebook, code, h), contexts=n_contexts * 2)
        return data

    def docs_page(self, label: str | None, page: int, per_page: int) -> dict[str, Any]:
        """Documents of the cache (optionally one label), a page at a time."""
        docs = [(i, d) for i, d in enumerate(self.cache.docs) if label is None or d.label == label]
        if label is not None and not docs:
            raise AppError(404, f"label={label!r} matches no document; labels: {self.labels()}")
        p = paginate(len(docs), page, per_page)
        return {
            "label": label,
            "labels": self.labels(),
            "pagination": p,
            "docs": [
                {
                    "doc": i,
                    "id": d.id,
                    "label": d.label,
                    "tokens": d.end - d.start,
                    "preview": d.text[:120],
                    "url": f"/text?doc={i}",
                }
                for i, d in docs[p["start"] : p["stop"]]
            ],
        }

    def _codebook_or_all(self, codebook: str | None) -> str | None:
        if codebook in (None, "", "all"):
            return None
        self.cache.info(codebook)
        return codebook

    def _check_size(self, codebook: str | None, n_tokens: int) -> None:
        """Refuse pages listing more than ``MAX_CODE_REFS`` codes (big models, all codebooks)."""
        names = list(self.cache.codebooks) if codebook is None else [codebook]
        per_token = sum(self.cache.info(n).groups * self.cache.info(n).k for n in names)
        if n_tokens * per_token > MAX_CODE_REFS:
            fit = max(1, MAX_CODE_REFS // per_token)
            raise ValueError(
                f"{n_tokens} tokens x {per_token} codes each is too much for one page "
                f"(at most {MAX_CODE_REFS} codes); "
                + ("choose one codebook or " if codebook is None else "")
                + f"show at most {fit} tokens per page (per_page)"
            )

    def text_doc(
        self, doc: int, codebook: str | None, page: int | None, per_page: int, pos: int | None
    ) -> dict[str, Any]:
        """Every token of one cached document (a page of it) with the codes that fire on it."""
        import numpy as np

        cache = self.cache
        if not 0 <= doc < cache.n_docs:
            raise AppError(404, f"doc={doc} is out of range; documents are 0 .. {cache.n_docs - 1}")
        d = cache.docs[doc]
        n = d.end - d.start
        if pos is not None:
            if not d.start <= pos < d.end:
                raise AppError(
                    404, f"pos={pos} is not in document {doc} (tokens {d.start} .. {d.end - 1})"
                )
            if page is None:
                page = (pos - d.start) // per_page + 1
        p = paginate(n, page or 1, per_page)
        lo, hi = d.start + p["start"], d.start + p["stop"]
        cb = self._codebook_or_all(codebook)
        self._check_size(cb, hi - lo)
        names = list(cache.codebooks) if cb is None else [cb]
        rows = {name: np.asarray(cache.codes(name)[lo:hi]) for name in names}
        offsets = np.asarray(cache.offsets[lo:hi]).tolist()
        token_ids = np.asarray(cache.tokens[lo:hi]).tolist()
        codes = self.token_codes(cb, rows)
        prev_end = int(cache.offsets[lo - 1][1]) if lo > d.start else 0
        tokens = []
        for i, ((s, e), tid) in enumerate(zip(offsets, token_ids, strict=True)):
            tokens.append(
                {
                    "pos": lo + i,
                    "token_id": tid,
                    **_token_text(d.text, s, e, prev_end),
                    "codes": codes[i],
                }
            )
            prev_end = max(prev_end, e)
        return {
            "source": "cache",
            "doc": doc,
            "id": d.id,
            "label": d.label,
            "codebook": cb,
            "codebooks": list(cache.codebooks),
            "selected": pos,
            "pagination": p,
            "tokens": tokens,
        }

    def text_paste(self, text: str, codebook: str | None) -> dict[str, Any]:
        """Tokenize pasted text, run the model once and show every token's codes."""
        from ..intervene import run_with_codes

        if self.model is None or self.tokenizer is None:
            raise AppError(
                409,
                "pasted text needs the model and its tokenizer; start the server with "
                "--model DIR (or pick a cached document)",
            )
        if not text.strip():
            raise ValueError("text is empty; paste some text")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        limit = self.cache.seq_len or 1024
        ids = list(enc["input_ids"])[:limit]
        if not ids:
            raise ValueError("text gives no tokens")
        offsets = [tuple(o) for o in enc["offset_mapping"][: len(ids)]]
        cb = self._codebook_or_all(codebook)
        self._check_size(cb, len(ids))
        with self.model_lock:
            result = run_with_codes(self.model, ids)
        rows = {}
        for name in list(self.cache.codebooks) if cb is None else [cb]:
            info = self.cache.info(name)
            rows[name] = result.codes[name][0].cpu().numpy().reshape(len(ids), info.groups, -1)
        codes = self.token_codes(cb, rows)
        tokens, prev_end = [], 0
        for i, ((s, e), tid) in enumerate(zip(offsets, ids, strict=True)):
            tokens.append(
                {
                    "pos": i,
                    "token_id": int(tid),
                    **_token_text(text, s, e, prev_end),
                    "codes": codes[i],
                }
            )
            prev_end = max(prev_end, e)
        return {
            "source": "pasted",
            "codebook": cb,
            "codebooks": list(self.cache.codebooks),
            "truncated": len(enc["input_ids"]) > limit,
            "max_tokens": limit,
            "tokens": tokens,
        }

    def steer(self, req: "SteerRequest") -> dict[str, Any]:
        """Unsteered and steered samples side by side (same prompt, same seeds)."""
        from ..intervene import compare, parse_prompt

        if self.model is None:
            raise AppError(409, "steering needs the model; start the server with --model DIR")
        prompt = parse_prompt(self.tokenizer, req.prompt)
        with self.model_lock:
            plain, steered = compare(
                self.model,
                self.tokenizer,
                prompt,
                req.spec,
                num_samples=req.num_samples,
                max_new_tokens=req.max_new_tokens,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                seed=req.seed,
            )
        return {
            "prompt": req.prompt,
            "spec": req.spec.to_dict(),
            "options": {
                "num_samples": req.num_samples,
                "max_new_tokens": req.max_new_tokens,
                "temperature": req.temperature,
                "top_k": req.top_k,
                "top_p": req.top_p,
                "seed": req.seed,
            },
            "unsteered": [g._asdict() for g in plain],
            "steered": [g._asdict() for g in steered],
        }


# ------------------------------------------------------------- steering input
@dataclass
class SteerRequest:
    """A validated steering request."""

    prompt: str
    spec: Any
    """An ``intervene.InterventionSpec`` (may be empty: then only unsteered samples)."""
    num_samples: int = 3
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


def _field(data: Any, name: str, default: Any = None) -> Any:
    value = data.get(name, default)
    if isinstance(value, str) and not value.strip():
        return default
    return value


def _int_field(data: Any, name: str, default: int | None, low: int, high: int) -> int | None:
    value = _field(data, name, default)
    if value is None:
        return None
    try:
        if isinstance(value, bool | float):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer") from None
    if not low <= number <= high:
        raise ValueError(f"{name}={number} is invalid; it must be in {low} .. {high}")
    return number


def _float_field(
    data: Any, name: str, default: float | None, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = _field(data, name, default)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid; it must be a number") from None
    check_range(name, number, low, high, low_open=low_open)
    return number


def parse_steer(data: Any, config: AppConfig) -> SteerRequest:
    """Build a ``SteerRequest`` from form/query fields or a JSON object.

    The spec is, in order of preference: ``spec`` (a JSON object, or YAML/JSON text),
    ``edits`` (a JSON list), or the single-edit form fields ``codebook``, ``codes``
    (``"12, 40"``), ``head``, ``positions``, ``action``, ``slot``, ``scale``.
    """
    from ..intervene import InterventionSpec

    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is missing; give the text to continue")
    if len(prompt) > config.max_prompt_chars:
        raise ValueError(
            f"prompt has {len(prompt)} characters; at most {config.max_prompt_chars} are allowed"
        )
    spec_value = _field(data, "spec")
    if isinstance(spec_value, str):
        if len(spec_value) > 20_000:
            raise ValueError("spec is too long (at most 20000 characters)")
        spec = InterventionSpec.from_yaml(spec_value, source="spec")  # YAML is a JSON superset
    elif spec_value is not None:
        spec = InterventionSpec.from_dict(spec_value, source="spec")
    elif data.get("edits") is not None:
        spec = InterventionSpec.from_dict(data["edits"], source="edits")
    elif _field(data, "codebook") is not None or _field(data, "codes") is not None:
        codebook, codes = _field(data, "codebook"), _field(data, "codes")
        if codebook is None or codes is None:
            raise ValueError("give both codebook and codes (e.g. codes='12, 40') to steer")
        if isinstance(codes, str):
            try:
                codes = [int(c) for c in codes.replace(",", " ").split()]
            except ValueError:
                raise ValueError(
                    f"codes={data.get('codes')!r} is invalid; give code ids like '12, 40'"
                ) from None
        edit: dict[str, Any] = {"codebook": codebook, "codes": codes}
        head = _int_field(data, "head", None, 0, 1 << 20)
        if head is not None:
            edit["head"] = head
        for name in ("positions", "action", "slot"):
            if _field(data, name) is not None:
                edit[name] = _field(data, name)
        if _field(data, "scale") is not None:
            edit["scale"] = _float_field(data, "scale", 1.0, -100.0, 100.0)
        spec = InterventionSpec.from_dict([edit], source="edit")
    else:
        spec = InterventionSpec()
    return SteerRequest(
        prompt=prompt,
        spec=spec,
        num_samples=_int_field(data, "num_samples", 3, 1, config.max_samples) or 3,
        max_new_tokens=_int_field(data, "max_new_tokens", 40, 1, config.max_new_tokens) or 40,
        temperature=_float_field(data, "temperature", 1.0, 0.0, 10.0) or 0.0,
        top_k=_int_field(data, "top_k", None, 1, 1 << 20),
        top_p=_float_field(data, "top_p", None, 0.0, 1.0, low_open=True),
        seed=_int_field(data, "seed", 0, 0, 2**31 - 1) or 0,
    )


# ---------------------------------------------------------------- the app
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
}


def create_app(
    config: AppConfig, *, cache: Any = None, model: Any = None, tokenizer: Any = None
) -> FastAPI:
    """The FastAPI app serving ``config.cache_dir`` (and ``config.model_dir`` if given).

    ``cache``/``model``/``tokenizer`` may be passed already loaded (tests, notebooks).
    """
    from typing import Annotated, Literal

    from fastapi import Path as PathParam
    from fastapi import Query

    lens = Lens(config, cache=cache, model=model, tokenizer=tokenizer)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["code_url"] = code_url
    templates.env.filters["quoted"] = _quoted
    app = FastAPI(
        title="codebook-lens",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        debug=False,
    )
    app.state.lens = lens
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    allowed_hosts = _allowed_hosts(config.host)

    # ----------------------------------------------------------- guards
    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if allowed_hosts is not None and host not in allowed_hosts:
            # A page elsewhere that resolves its own name to 127.0.0.1 (DNS rebinding).
            return _error_response(request, templates, 400, f"host {host!r} is not served here")
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin:
            o = urlsplit(origin)
            if (o.hostname or "").lower() not in (allowed_hosts or {host}):
                return _error_response(request, templates, 403, "cross-site request refused")
        response: Response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    # ----------------------------------------------------------- errors
    @app.exception_handler(AppError)
    async def on_app_error(request: Request, exc: AppError) -> Response:
        return _error_response(request, templates, exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else _reason(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page at {request.url.path}"
        return _error_response(request, templates, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(request, templates, 422, _validation_message(exc))

    @app.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError) -> Response:
        return _error_response(request, templates, 400, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def on_missing(request: Request, exc: FileNotFoundError) -> Response:
        return _error_response(request, templates, 404, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("error serving %s", request.url.path, exc_info=exc)
        return _error_response(
            request, templates, 500, "internal error; the server log has the details"
        )

    def page(
        request: Request, name: str, data: dict[str, Any], *, status: int = 200, **extra: Any
    ) -> Response:
        path = request.url.path
        api = "/api" + path.rstrip("/") if path != "/" else "/api/overview"
        if request.url.query:
            api += "?" + request.url.query
        context = {"d": data, "lens": lens, "api_url": api, "config": config, **extra}
        return templates.TemplateResponse(request, name, context, status_code=status)

    PerPage = Annotated[int, Query(ge=1, le=config.max_page_size)]
    Page = Annotated[int, Query(ge=1, le=1_000_000)]
    Head = Annotated[int | None, Query(ge=0, le=1 << 20)]
    Code = Annotated[int, PathParam(ge=0, le=1 << 40)]
    Contexts = Annotated[int, Query(ge=1, le=config.max_page_size)]
    Window = Annotated[int, Query(ge=0, le=400)]
    Kind = Annotated[Literal["regex", "token", "topic"], Query()]
    Sort = Annotated[Literal["f1", "precision", "recall", "count"], Query()]
    QueryText = Annotated[str, Query(max_length=config.max_query_chars)]
    Name = Annotated[str | None, Query(max_length=300)]
    Fraction = Annotated[float, Query(ge=0.0, le=1.0)]
    MinCount = Annotated[int, Query(ge=0, le=1 << 40)]

    # --------------------------------------------------------- overview
    @app.get("/api/overview")
    def api_overview() -> JSONResponse:
        return JSONResponse(lens.overview())

    @app.get("/", response_class=HTMLResponse)
    def overview_page(request: Request) -> Response:
        return page(request, "overview.html", lens.overview(), active="overview", title="Overview")

    @app.get("/plots/{name}.png")
    def plot(name: Annotated[str, PathParam(max_length=300)]) -> Response:
        from fastapi.responses import FileResponse

        return FileResponse(lens.plot(name), media_type="image/png")

    # ----------------------------------------------------------- search
    def run_search(
        kind: str,
        q: str,
        codebook: str | None,
        sort: str,
        min_count: int,
        min_precision: float,
        min_recall: float,
        page_no: int,
        per_page: int,
    ) -> dict[str, Any]:
        if not q.strip():
            raise ValueError("q is empty; give a regex, a token or a topic to search for")
        return lens.search(
            kind,
            q,
            codebook=codebook or None,
            sort=sort,
            min_count=min_count,
            min_precision=min_precision,
            min_recall=min_recall,
            page=page_no,
            per_page=per_page,
        )

    @app.get("/api/search")
    def api_search(
        q: QueryText,
        kind: Kind = "regex",
        codebook: Name = None,
        sort: Sort = "f1",
        min_count: MinCount = 1,
        min_precision: Fraction = 0.0,
        min_recall: Fraction = 0.0,
        page: Page = 1,
        per_page: PerPage = config.page_size,
    ) -> JSONResponse:
        return JSONResponse(
            run_search(
                kind, q, codebook, sort, min_count, min_precision, min_recall, page, per_page
            )
        )

    @app.get("/search", response_class=HTMLResponse)
    def search_page(
        request: Request,
        q: QueryText = "",
        kind: Kind = "regex",
        codebook: Name = None,
        sort: Sort = "f1",
        min_count: MinCount = 1,
        min_precision: Fraction = 0.0,
        min_recall: Fraction = 0.0,
        page_no: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
        per_page: PerPage = 10,
    ) -> Response:
        form = {
            "q": q,
            "kind": kind,
            "codebook": codebook or "",
            "sort": sort,
            "min_count": min_count,
            "min_precision": min_precision,
            "min_recall": min_recall,
            "per_page": per_page,
        }
        data = None
        if q.strip():
            data = run_search(
                kind, q, codebook, sort, min_count, min_precision, min_recall, page_no, per_page
            )
        return page(
            request,
            "search.html",
            data or {},
            form=form,
            has_result=data is not None,
            codebooks=list(lens.cache.codebooks),
            labels=lens.labels(),
            active="search",
            title="Search" if not q else f"Search {q!r}",
            prev_url=with_query(str(request.url.path) + "?" + request.url.query, page=page_no - 1)
            if page_no > 1
            else None,
            next_url=with_query(str(request.url.path) + "?" + request.url.query, page=page_no + 1)
            if data and data["has_next"]
            else None,
        )

    # ------------------------------------------------------------- code
    @app.get("/api/code/{codebook}/{code}")
    def api_code(
        codebook: Annotated[str, PathParam(max_length=300)],
        code: Code,
        head: Head = None,
        contexts: Contexts = 20,
        window: Window = 60,
    ) -> JSONResponse:
        return JSONResponse(lens.code(codebook, code, head, n_contexts=contexts, window=window))

    @app.get("/code/{codebook}/{code}", response_class=HTMLResponse)
    def code_page(
        request: Request,
        codebook: Annotated[str, PathParam(max_length=300)],
        code: Code,
        head: Head = None,
        contexts: Contexts = 20,
        window: Window = 60,
    ) -> Response:
        data = lens.code(codebook, code, head, n_contexts=contexts, window=window)
        can_more = contexts < config.max_page_size and len(data["contexts"]) == contexts
        return page(
            request,
            "code.html",
            data,
            active="search",
            title=data["ref"]["label"],
            can_more=can_more,
        )

    # ------------------------------------------------------------- text
    @app.get("/api/docs")
    def api_docs(
        label: Name = None, page: Page = 1, per_page: PerPage = config.page_size
    ) -> JSONResponse:
        return JSONResponse(lens.docs_page(label or None, page, per_page))

    @app.get("/api/text")
    def api_text(
        doc: Annotated[int, Query(ge=0, le=1 << 40)],
        codebook: Name = None,
        page: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
        per_page: Annotated[int, Query(ge=1, le=5000)] = 500,
        pos: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
    ) -> JSONResponse:
        return JSONResponse(lens.text_doc(doc, codebook, page, per_page, pos))

    @app.post("/api/text")
    async def api_text_paste(request: Request) -> Response:
        body = await _read_json(request, config.max_text_chars * 4 + 4096)
        text = body.get("text")
        if not isinstance(text, str):
            raise ValueError('text is missing; send {"text": "..."}')
        _check_text(text, config)
        codebook = body.get("codebook")
        if codebook is not None and not isinstance(codebook, str):
            raise ValueError("codebook must be a codebook name")
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(lens.text_paste, text, codebook))

    @app.get("/text", response_class=HTMLResponse)
    def text_page(
        request: Request,
        doc: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
        codebook: Name = None,
        label: Name = None,
        page_no: Annotated[int | None, Query(alias="page", ge=1, le=1_000_000)] = None,
        per_page: Annotated[int, Query(ge=1, le=5000)] = 500,
        pos: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
    ) -> Response:
        if doc is None:
            docs = lens.docs_page(label or None, page_no or 1, config.page_size)
            return page(
                request,
                "text.html",
                docs,
                mode="list",
                active="text",
                title="Text",
                codebooks=list(lens.cache.codebooks),
            )
        data = lens.text_doc(doc, codebook or list(lens.cache.codebooks)[0], page_no, per_page, pos)
        return page(
            request,
            "text.html",
            data,
            mode="doc",
            active="text",
            title=f"Document {data['id']}",
            codebooks=list(lens.cache.codebooks),
        )

    @app.post("/text", response_class=HTMLResponse)
    async def text_paste_page(request: Request) -> Response:
        form = await _read_form(request, config.max_text_chars * 12 + 4096)
        text = form.get("text", "")
        _check_text(text, config)
        codebook = form.get("codebook") or list(lens.cache.codebooks)[0]
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(lens.text_paste, text, codebook)
        return page(
            request,
            "text.html",
            data,
            mode="pasted",
            active="text",
            title="Pasted text",
            codebooks=list(lens.cache.codebooks),
            pasted=text,
        )

    # ------------------------------------------------------------ steer
    @app.post("/api/steer")
    async def api_steer(request: Request) -> Response:
        body = await _read_json(request, 64_000)
        req = parse_steer(body, config)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(lens.steer, req))

    @app.get("/api/steer")
    def api_steer_get(request: Request) -> JSONResponse:
        params = _query_dict(request)
        return JSONResponse(lens.steer(parse_steer(params, config)))

    @app.get("/steer", response_class=HTMLResponse)
    def steer_page(request: Request) -> Response:
        params = _query_dict(request)
        data = None
        error = None
        if params.get("prompt", "").strip():
            try:
                data = lens.steer(parse_steer(params, config))
            except (ValueError, AppError) as e:
                error = e.message if isinstance(e, AppError) else str(e)
        return page(
            request,
            "steer.html",
            data or {},
            status=400 if error else 200,
            form=params,
            result=data,
            error=error,
            codebooks=lens.cache.codebooks,
            active="steer",
            title="Steer",
            can_steer=lens.can_steer,
        )

    return app


def _allowed_hosts(host: str) -> set[str] | None:
    """Host names a request may address: loopback names when bound to loopback, else any."""
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return {"127.0.0.1", "localhost", "::1", host}
    return None


def _error_response(
    request: Request, templates: Jinja2Templates, status: int, message: str
) -> Response:
    """The error as JSON under ``/api/`` (``{"error": {status, message}}``), else an HTML page."""
    if request.url.path.startswith("/api/"):
        return JSONResponse(
            {"error": {"status": status, "reason": _reason(status), "message": message}},
            status_code=status,
            headers=_SECURITY_HEADERS,
        )
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "status": status,
            "reason": _reason(status),
            "message": message,
            "title": "Error",
            "active": None,
            "api_url": None,
        },
        status_code=status,
        headers=_SECURITY_HEADERS,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise AppError(413, f"request body too large; at most {limit} bytes are accepted")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise AppError(413, f"request body too large; at most {limit} bytes are accepted")
    return body


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    import json

    body = await _read_body(request, limit)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


async def _read_form(request: Request, limit: int) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the last value of each field)."""
    body = await _read_body(request, limit)
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"the form data is invalid ({e})") from None
    return {k: v[-1] for k, v in fields.items()}


def _query_dict(request: Request) -> dict[str, str]:
    if len(request.query_params) > 50:
        raise ValueError("too many query parameters")
    return {k: v for k, v in request.query_params.items()}


def _check_text(text: str, config: AppConfig) -> None:
    if len(text) > config.max_text_chars:
        raise ValueError(
            f"text has {len(text)} characters; at most {config.max_text_chars} are allowed"
        )


def serve(config: AppConfig, *, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (blocking)."""
    import uvicorn

    app = create_app(config)
    lens: Lens = app.state.lens

    def warm() -> None:  # draw the health plots before the first visitor asks for them
        try:
            lens.plot("summary")
        except Exception as e:  # the overview page will show the error itself
            log.warning("could not draw the health plots: %s", e)

    threading.Thread(target=warm, daemon=True).start()
    if _allowed_hosts(config.host) is None:
        log.warning("serving on %s: the app is reachable from the network", config.host)
    if config.port:  # with port 0 uvicorn reports the port it picked
        print(f"codebook-lens: serving {config.cache_dir} on http://{config.host}:{config.port}/")
    try:
        uvicorn.run(
            app, host=config.host, port=config.port, log_level=log_level, server_header=False
        )
    finally:
        app.state.lens.close()
