"""Dataclass configs turned into command-line flags (``codebook_lens.flags``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from codebook_lens.flags import add_dataclass_args, dataclass_from_args, field_docs, flag


@dataclass
class Base:
    width: int = 8
    """Width of the thing."""


@dataclass
class Options(Base):
    cache: str = field(default="", metadata=flag(positional=True))
    """The cache folder."""
    regex: str | None = field(default=None, metadata=flag(exclusive="q", required=True))
    """A regex."""
    token: str | None = field(default=None, metadata=flag(exclusive="q", required=True))
    """A token."""
    num_samples: int = field(default=5, metadata=flag(name="--n"))
    """Samples."""
    json: bool = field(default=False, metadata=flag(switch=True))
    """Print JSON."""
    codebook: list[str] | None = field(default=None, metadata=flag(repeat=True))
    """Only this codebook (repeatable)."""
    globs: list[str] = field(default_factory=lambda: ["all"], metadata=flag(nargs="+"))
    """Globs."""
    out: str = field(default="", metadata=flag(required=True))
    """Output folder."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_args(p, Options)
    return p


def test_flags_from_field_metadata() -> None:
    args = parser().parse_args(
        ["c", "--token", "May", "--n", "3", "--json", "--codebook", "a", "--codebook", "b",
         "--globs", "x", "y", "--out", "o"]
    )  # fmt: skip
    cfg = dataclass_from_args(Options, args)
    assert cfg == Options(
        width=8, cache="c", token="May", num_samples=3, json=True, codebook=["a", "b"],
        globs=["x", "y"], out="o",
    )  # fmt: skip
    unset = dataclass_from_args(Options, parser().parse_args(["c", "--regex", "x", "--out", "o"]))
    assert unset.json is False and unset.globs == ["all"] and unset.num_samples == 5


@pytest.mark.parametrize(
    "argv",
    [
        ["c", "--out", "o"],  # one of the exclusive group is required
        ["c", "--regex", "a", "--token", "b", "--out", "o"],  # not both
        ["c", "--regex", "a"],  # --out is required
        ["--regex", "a", "--out", "o"],  # the positional is required
    ],
)
def test_flag_constraints(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser().parse_args(argv)


def test_inherited_field_docs_become_help() -> None:
    assert field_docs(Options)["width"] == "Width of the thing."
    text = parser().format_help()
    assert "Width of the thing. (default: 8)" in text
    assert "--n NUM_SAMPLES" in text and "--no-json" not in text
