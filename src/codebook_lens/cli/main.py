"""The ``codebook-lens`` command: one subcommand per stage, each a thin call into a module.

Dataclass configs are turned into flags (``--num-codes 1000``, see ``flags.py``), so a config's
field docstrings are the ``--help`` text. Every user error exits with code 2 and one clear line
on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

# threads first: it sets OpenMP's wait policy before anything loads torch.
from codebook_lens import threads  # isort: skip
from codebook_lens.cli import app, codes, experiments, model, training
from codebook_lens.cli.base import COMMANDS, EXIT_USAGE

SUBCOMMAND_MODULES = (model, training, codes, app, experiments)
"""The modules whose ``@command`` set-ups make up the CLI, in pipeline order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebook-lens",
        description="Codebook features: train, evaluate, search and steer discrete codes in LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup) in sorted(COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
    return parser


def entry() -> int:
    """The ``codebook-lens`` program: ``main`` with this process's automatic thread policy."""
    return main(own_process=True)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one subcommand; returns its exit code (2 for a user error, with one line on stderr).

    Long commands run under the thread policy (``threads.use``) when ``--threads N`` is given
    or when this is the program's own process (``entry``); a caller's torch threads stay as
    they are otherwise.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    requested = getattr(args, "cpu_threads", None)
    scope = (
        threads.use(requested)
        if requested is not None and (requested or own_process)
        else contextlib.nullcontext()
    )
    try:
        with scope:
            code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"codebook-lens {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)
