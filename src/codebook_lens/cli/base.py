"""What every subcommand module shares: the command registry, ``--threads``, small checks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int | None]
Setup = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, Setup]] = {}
"""Every subcommand: its help line and the set-up that adds its flags and sets ``func``."""


def command(name: str, help: str) -> Callable[[Setup], Setup]:
    """Register ``setup(parser)`` as the subcommand ``name``."""

    def wrap(setup: Setup) -> Setup:
        COMMANDS[name] = (help, setup)
        return setup

    return wrap


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads`` of every long command (the demo has it in its config)."""
    p.add_argument(
        "--threads",
        dest="cpu_threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 (default): the cores no other process is using, re-checked "
        "as the load changes",
    )


def load_model(path: str, device: str | None = None) -> tuple[Any, Any]:
    from codebook_lens.codes.intervene import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=device)


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}={value} is invalid; it must be an integer >= 1")
