"""Experiment reports: one builder writes ``report.md``, a self-contained ``report.html``
(figures embedded) and the figures as PNG files beside them.

    rep = Report("FSM demo")
    rep.paragraph("What was run.")
    rep.table([{"model": "base", "loss": 1.2}], caption="Metrics")
    fig, ax = plt.subplots(); ax.plot(xs, ys); rep.figure(fig, "loss", caption="Training loss")
    rep.write(out_dir)
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written headless, on any machine
from matplotlib.figure import Figure  # noqa: E402

from codebook_lens.config import write_bytes_atomic  # noqa: E402

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f5f5f7}
td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;font-weight:600;
padding:.3em 0}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}code,pre{background:#f5f5f7;border-radius:4px;padding:.1em .3em}
pre{padding:.6em;overflow-x:auto}.note{color:#555;font-size:.92em}
"""


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers rounded for reading; everything else as text."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 10 ** (-digits):
            return f"{value:.3e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0")
    return str(value)


@dataclass
class _Block:
    kind: str
    data: Any


@dataclass
class Report:
    """An ordered list of headings, text, tables and figures."""

    title: str
    blocks: list[_Block] = field(default_factory=list)
    _figures: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(_Block("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", text))

    def code(self, text: str) -> None:
        self.blocks.append(_Block("code", text))

    def table(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        columns: Sequence[str] | None = None,
        caption: str = "",
    ) -> None:
        """A table from a list of row dicts (columns default to the first row's keys)."""
        cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
        body = [[format_value(r.get(c, "")) for c in cols] for r in rows]
        self.blocks.append(_Block("table", (caption, cols, body)))

    def figure(self, fig: Figure, name: str, *, caption: str = "", dpi: int = 110) -> None:
        """Add a matplotlib figure, stored as ``{name}.png``; the figure is closed."""
        import matplotlib.pyplot as plt

        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"figure name={name!r} is invalid; use letters, digits, '_' and '-'")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        self._figures[name] = buf.getvalue()
        self.blocks.append(_Block("figure", (name, caption)))

    # ---------------------------------------------------------------- render
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                level, text = b.data
                out += ["#" * level + " " + text, ""]
            elif b.kind == "paragraph":
                out += [b.data, ""]
            elif b.kind == "code":
                out += ["```", b.data, "```", ""]
            elif b.kind == "table":
                caption, cols, body = b.data
                if caption:
                    out += [f"**{caption}**", ""]
                out.append("| " + " | ".join(cols) + " |")
                out.append("|" + "|".join("---" for _ in cols) + "|")
                out += ["| " + " | ".join(row) + " |" for row in body]
                out.append("")
            elif b.kind == "figure":
                name, caption = b.data
                out += [f"![{caption or name}]({name}.png)", ""]
                if caption:
                    out += [f"*{caption}*", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        esc = html.escape
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "heading":
                level, text = b.data
                parts.append(f"<h{level}>{esc(text)}</h{level}>")
            elif b.kind == "paragraph":
                parts.append(f"<p>{esc(b.data)}</p>")
            elif b.kind == "code":
                parts.append(f"<pre><code>{esc(b.data)}</code></pre>")
            elif b.kind == "table":
                caption, cols, body = b.data
                head = "".join(f"<th>{esc(c)}</th>" for c in cols)
                rows = "".join(
                    "<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in body
                )
                cap = f"<caption>{esc(caption)}</caption>" if caption else ""
                parts.append(
                    f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
                )
            elif b.kind == "figure":
                name, caption = b.data
                data = base64.b64encode(self._figures[name]).decode("ascii")
                cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
                parts.append(
                    f"<figure><img alt='{esc(caption or name)}' src='data:image/png;base64,{data}'>"
                    f"{cap}</figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; returns the HTML path.

        Each file goes through a temporary name and a rename, so none is ever half-written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, png in self._figures.items():
            write_bytes_atomic(out / f"{name}.png", png)
        write_bytes_atomic(out / "report.md", self.to_markdown().encode("utf-8"))
        write_bytes_atomic(out / "report.html", self.to_html().encode("utf-8"))
        return out / "report.html"
