"""How the app names and links things: code references, page URLs, pagination."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from codebook_lens.app.config import AppError


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
