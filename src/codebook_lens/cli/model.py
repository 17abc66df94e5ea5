"""Subcommands of the model stage: ``convert`` (the paper's checkpoints), ``architectures``."""

from __future__ import annotations

import argparse

from codebook_lens.cli.base import command


@command("convert", "convert a checkpoint of the paper's reference code into a codebook-lens model")
def _convert_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="reference checkpoint: folder or hub id (model_type 'codebook')")
    p.add_argument("out", help="model folder to write (safetensors + JSON)")
    p.add_argument(
        "--base",
        default=None,
        help="folder or hub id whose config.json describes the base model (weights: from SRC)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to carry: 'digits' (TokFSM), 'gpt2' (TinyStories), a folder or hub id",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder")

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.model.reference import convert_reference

        model = convert_reference(
            args.src, args.out, args.base, tokenizer=args.tokenizer, overwrite=args.overwrite
        )
        names = list(model.codebooks)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        print(
            f"wrote {args.out}: {len(names)} codebooks ({shown}); their reference keys are "
            "under 'origin' in codebook_config.json"
        )
        return 0

    p.set_defaults(func=run)


@command("architectures", "check which transformers architectures take codebooks (tiny models)")
def _architectures_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated model types to check (default: every causal LM of transformers)",
    )
    p.add_argument(
        "--write", metavar="PATH", default=None, help="write the table to PATH (e.g. docs/...)"
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.model.architecture_checks import (
            architectures_markdown,
            check_architectures,
            check_doc_path,
            write_architectures_doc,
        )

        only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
        if args.write:
            check_doc_path(args.write)  # before minutes of checks, not after
        checks = check_architectures(only)
        if args.write:
            out = write_architectures_doc(args.write, checks)
            print(f"wrote {out} ({len(checks)} architectures)")
        else:
            print(architectures_markdown(checks), end="")
        return 0

    p.set_defaults(func=run)
