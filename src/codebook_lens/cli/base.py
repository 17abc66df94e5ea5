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


def load_model(
    path: str,
    device: str | None = None,
    saes: list[str] | None = None,
    sae_k: int | None = None,
) -> tuple[Any, Any]:
    from codebook_lens.codes.intervene import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=device, saes=saes, sae_k=sae_k)


def add_saes(p: argparse.ArgumentParser, what: str) -> None:
    """``--sae PATH`` (repeatable) and ``--sae-k N``: SAEs read at sites of the model."""
    p.add_argument(
        "--sae",
        action="append",
        metavar="PATH",
        help=f"an SAE {what}: a sparsify hookpoint or run folder, or a SAELens SAE folder "
        "(repeatable); MODEL may then be a plain Hugging Face model folder",
    )
    p.add_argument(
        "--sae-k",
        type=int,
        default=None,
        help="latents kept per token for SAEs without a fixed k (BatchTopK, JumpReLU, ...)",
    )


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}={value} is invalid; it must be an integer >= 1")
