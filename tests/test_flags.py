"""Dataclass configs turned into command-line flags (``codebook_lens.flags``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace

import pytest

from codebook_lens.config import config_from_dict, flat_names
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


@dataclass
class Inner:
    steps: int = 10
    """Optimizer steps."""
    lr: float = 1e-3
    """Learning rate."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid; it must be >= 1")


@flat_names(pre_steps="pre.steps", fine_steps="fine.steps", lr=("pre.lr", "fine.lr"))
@dataclass
class Outer:
    name: str = "run"
    """A name."""
    pre: Inner = field(default_factory=lambda: Inner(steps=100))
    """Pretraining."""
    fine: Inner = field(default_factory=Inner)
    """Fine-tuning."""


def test_flat_names_set_read_and_write_the_held_configs() -> None:
    cfg = Outer(pre_steps=5, lr=0.1)  # type: ignore[call-arg]
    assert (cfg.pre, cfg.fine) == (Inner(5, 0.1), Inner(10, 0.1))
    assert (cfg.pre_steps, cfg.lr) == (5, 0.1)  # type: ignore[attr-defined]
    cfg.lr = 0.2  # type: ignore[attr-defined]
    assert (cfg.pre.lr, cfg.fine.lr) == (0.2, 0.2)
    assert asdict(cfg) == {
        "name": "run",
        "pre": asdict(Inner(5, 0.2)),
        "fine": asdict(Inner(10, 0.2)),
    }
    assert replace(cfg, name="b").pre == Inner(5, 0.2)
    given = Outer(pre=Inner(7), fine_steps=3)  # type: ignore[call-arg]
    assert (given.pre.steps, given.fine.steps) == (7, 3)


def test_flat_names_errors_name_what_was_given() -> None:
    with pytest.raises(ValueError, match=r"^fine_steps=0 is invalid"):
        Outer(fine_steps=0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"^fine_steps=0 is invalid"):
        Outer().fine_steps = 0  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="flat name"):
        flat_names(name="pre.steps")(Outer)


def test_flat_names_in_json_and_flags() -> None:
    cfg = Outer(pre_steps=5)  # type: ignore[call-arg]
    assert config_from_dict(Outer, json.loads(json.dumps(asdict(cfg)))) == cfg
    assert config_from_dict(Outer, {"pre_steps": 5}) == cfg  # flat keys of older files
    with pytest.raises(ValueError, match=r"config: pre: field 'steps' has value 'x'"):
        config_from_dict(Outer, {"pre": {"steps": "x"}})
    p = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_args(p, Outer)
    text = p.format_help()
    assert "--pre-steps" in text and "--pre " not in text and "[sets pre.lr, fine.lr]" in text
    assert "(default: 100)" in " ".join(text.split())
    got = dataclass_from_args(Outer, p.parse_args(["--lr", "0.5"]), base=Outer(fine_steps=4))  # type: ignore[call-arg]
    assert (got.pre, got.fine) == (Inner(100, 0.5), Inner(4, 0.5))
