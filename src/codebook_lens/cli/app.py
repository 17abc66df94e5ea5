"""The ``serve`` subcommand: the web code browser."""

from __future__ import annotations

import argparse

from codebook_lens.cli.base import command


@command("serve", "browse a code cache in a local web app (search, code pages, text, steering)")
def _serve_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="cache folder written by `cache`")
    p.add_argument(
        "--model", dest="model_dir", metavar="DIR", help="the cache's model: enables steering"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free (default: 8000)")
    p.add_argument(
        "--regex-timeout", type=float, default=2.0, help="seconds per user regex (default: 2)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=200, help="steering limit per sample (default: 200)"
    )
    p.add_argument(
        "--search-workers",
        type=int,
        default=None,
        help="processes running searches (default: one per core; 0 = in the server process)",
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.app import AppConfig, serve

        config = AppConfig(
            cache_dir=args.cache_dir,
            model_dir=args.model_dir,
            host=args.host,
            port=args.port,
            regex_timeout=args.regex_timeout,
            max_new_tokens=args.max_new_tokens,
            search_workers=args.search_workers,
        )
        from codebook_lens.codes.cache import CodeCache

        for note in CodeCache(args.cache_dir).notes():  # codebooks or indices left out
            print(f"note: {note}")
        serve(config)
        return 0

    p.set_defaults(func=run)
