"""The ``codebook-lens`` command: ``main`` parses the flags and runs one subcommand."""

from codebook_lens.cli.main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
