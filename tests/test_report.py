"""Report builder: markdown + self-contained HTML + PNG files, escaped and atomic."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from codebook_lens.report import Report, format_value


def test_report_writes_all_files(tmp_path: Path) -> None:
    rep = Report("Demo <run>")
    rep.heading("Metrics")
    rep.paragraph("a & b")
    rep.table(
        [{"model": "base", "loss": 1.23456789}, {"model": "codebook", "loss": 1.3}], caption="Loss"
    )
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    rep.figure(fig, "curve", caption="A curve")
    html_path = rep.write(tmp_path)
    assert html_path == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "report.html", "report.md"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = html_path.read_text()
    assert "Demo &lt;run&gt;" in html and "a &amp; b" in html
    assert "data:image/png;base64," in html
    md = (tmp_path / "report.md").read_text()
    assert "| model | loss |" in md and "| base | 1.235 |" in md
    assert "![A curve](curve.png)" in md


def test_bad_figure_name() -> None:
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="figure name='../x' is invalid"):
        Report("r").figure(fig, "../x")


def test_format_value() -> None:
    assert format_value(0.123456) == "0.1235"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(True) == "True"
    assert format_value(float("nan")) == "nan"
    assert format_value(0.0) == "0"
    assert format_value(0.5) == "0.5"
