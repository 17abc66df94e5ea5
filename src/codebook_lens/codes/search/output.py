"""Search results and code profiles as text tables, terminal text and HTML pages."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from codebook_lens.codes.search.profiles import CodeProfile, LabelCount, TokenCount
from codebook_lens.codes.search.ranking import SearchResult
from codebook_lens.config import write_bytes_atomic


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
    return head + "\n" + format_table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned columns: the first row is the header (underlined), the first
    column is left-aligned and the others right-aligned."""
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
    if p.activations is not None:
        a = p.activations
        out[-1:] = [f"{p.kind} latent: activation mean {a.mean:.3g}, max {a.max:.3g}", ""]
    out.append("contexts:")
    style: Literal["ansi", "brackets"] = "ansi" if color else "brackets"
    out += [
        f"  {c.render(style)}" + ("" if c.activation is None else f"  ({c.activation:.3g})")
        for c in p.contexts
    ] or ["  (never fires)"]
    tables: list[tuple[str, str, list[tuple[str, TokenCount | LabelCount, str]]]] = [
        ("tokens", "token", [(repr(t.text), t, ".3f") for t in p.tokens])
    ]
    if any(lab.label is not None for lab in p.labels):
        tables.append(("document labels", "label", [(str(x.label), x, ".4f") for x in p.labels]))
    for title, key, rows in tables:
        if rows:
            cells = [(k, str(x.count), f"{x.share:.3f}", format(x.coverage, f)) for k, x, f in rows]
            out += ["", f"{title}:", format_table([(key, "count", "share", "coverage"), *cells])]
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
        f"of {p.num_codes}</p>",
        *_activations_html(p),
        "<h2>contexts</h2><ul>",
        *[
            f"<li>{c.render('html')}"
            + ("" if c.activation is None else f"  ({c.activation:.3g})")
            + "</li>"
            for c in p.contexts
        ],
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


def _activations_html(p: CodeProfile) -> list[str]:
    """An SAE latent's activation summary and histogram (nothing for codes)."""
    a = p.activations
    if a is None:
        return []
    rows = [
        f"<tr><td>{lo:.3g} .. {hi:.3g}</td><td>{n}</td></tr>"
        for lo, hi, n in zip(a.edges, a.edges[1:], a.histogram, strict=False)
    ]
    return [
        f"<p>{html.escape(p.kind)} latent: activation mean {a.mean:.3g}, min {a.min:.3g}, "
        f"max {a.max:.3g}</p>",
        "<table><tr><th>activation</th><th>firings</th></tr>",
        *rows,
        "</table>",
    ]


def save_html(page: str, path: str | os.PathLike[str]) -> Path:
    """Write an HTML page atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
