"""The ``serve`` subcommand: the web code browser."""

from __future__ import annotations

import argparse

from codebook_lens.app.config import AppConfig
from codebook_lens.cli.base import command
from codebook_lens.flags import add_dataclass_args, dataclass_from_args


@command("serve", "browse a code cache in a local web app (search, code pages, text, steering)")
def _serve_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="cache folder written by `cache`")
    p.add_argument(
        "--model", dest="model_dir", metavar="DIR", help="the cache's model: enables steering"
    )
    add_dataclass_args(p, AppConfig, skip=("cache_dir", "model_dir"))
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from codebook_lens.app import serve
    from codebook_lens.codes.cache import CodeCache

    config = dataclass_from_args(AppConfig, args)
    for note in CodeCache(config.cache_dir).notes():  # codebooks or indices left out
        print(f"note: {note}")
    serve(config)
    return 0
