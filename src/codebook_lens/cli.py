"""The ``codebook-lens`` command: one subcommand per stage, each a thin call into a module.

Dataclass configs are turned into flags (``--num-codes 1000``), so a config's field docstrings
are the ``--help`` text. Every user error exits with code 2 and one clear line on stderr.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args, get_origin

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Any]:
    """Register ``setup(parser)``; the parser's ``func`` default runs the command."""

    def wrap(setup: Callable[[argparse.ArgumentParser], None]) -> Any:
        def run(args: argparse.Namespace) -> int | None:
            return args.func(args)  # type: ignore[no-any-return]

        _COMMANDS[name] = (help, setup, run)
        return setup

    return wrap


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (sparsify style)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_list(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError(f"expected a list, got {text!r}")
        return value
    out: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            out.append(part)
    return out


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: Sequence[str] = ()
) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (defaults left as ``None`` = unset)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()  # type: ignore[misc]
            if f.default_factory is not dataclasses.MISSING
            else None
        )
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None, "help": help_text}
        origin = get_origin(tp)
        args = [a for a in get_args(tp) if a is not type(None)]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
        elif origin is list or any(get_origin(a) is list for a in args):
            kwargs["type"] = _parse_list
            kwargs["metavar"] = "A,B,..."
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif args and all(a in (int, float, str) for a in args):
            kwargs["type"] = args[0]
        else:
            kwargs["type"] = str
        group.add_argument(flag, **kwargs)


def dataclass_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", base: Any = None
) -> Any:
    """Build ``cls`` from parsed flags; unset flags keep ``base``'s (or the default) values."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        v = getattr(args, prefix + f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebook-lens",
        description="Codebook features: train, evaluate, search and steer discrete codes in LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup, _) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"codebook-lens {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)


# ---------------------------------------------------------------- commands
# Each stage registers one subcommand below: a setup function that adds flags and sets
# ``func``; the work itself lives in the stage's module.


@command("generate", "sample from a codebook model, with and without an intervention spec")
def _generate_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="folder written by CodebookModel.save_pretrained (or a hub id)")
    p.add_argument("prompt", help="prompt text (token ids separated by spaces if no tokenizer)")
    p.add_argument("--intervene", metavar="SPEC", help="intervention spec file (.yaml or .json)")
    p.add_argument("--n", type=int, default=5, help="samples per column (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="(default: 40)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")

    def run(args: argparse.Namespace) -> int:
        import shutil

        from . import intervene as iv

        spec = iv.InterventionSpec.load(args.intervene) if args.intervene else None
        model, tokenizer = iv.load_model_and_tokenizer(args.model, device=args.device)
        prompt = iv.parse_prompt(tokenizer, args.prompt)
        plain, steered = iv.compare(
            model,
            tokenizer,
            prompt,
            spec,
            num_samples=args.n,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        if args.json:
            out = {
                "prompt": args.prompt,
                "unsteered": [g._asdict() for g in plain],
                "steered": [g._asdict() for g in steered],
            }
            print(json.dumps(out))
        else:
            width = shutil.get_terminal_size((120, 24)).columns
            print(iv.format_side_by_side(args.prompt, plain, steered, width))
        return 0

    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
