"""Dataclass configs <-> command-line flags.

``add_dataclass_args(parser, TrainConfig)`` adds one ``--flag`` per field (``--warmup-steps``),
with the field's docstring as its ``--help`` text; ``dataclass_from_args(TrainConfig, args)``
builds the config back from the parsed flags. Flags that were not given stay ``None`` in
``args``, so they never override a value from a saved run or a ``--config`` file. A field's
``metadata=flag(...)`` shapes its argument (a positional, another name, a switch, a
repeatable flag, one of a mutually exclusive group). A config that holds other configs gets
flags for their fields only through its ``config.flat_names`` (``--width`` for ``lm.width``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from codebook_lens.config import config_from_dict, field_default, flat_names_of, is_config_type


def flag(
    *,
    name: str | None = None,
    positional: bool = False,
    switch: bool = False,
    nargs: str | None = None,
    repeat: bool = False,
    exclusive: str | None = None,
    required: bool = False,
    metavar: str | None = None,
) -> dict[str, Any]:
    """``dataclasses.field(metadata=...)`` for a field whose flag is not the plain ``--name``.

    Args:
        name: the flag (e.g. ``"--n"``); the parsed value still lands under the field's name.
        positional: an argument without ``--`` (required).
        switch: a ``store_true`` flag (no ``--no-...`` form).
        nargs: e.g. ``"+"`` for ``--codebooks A B``.
        repeat: ``--codebook A --codebook B`` collects a list.
        exclusive: the fields sharing this group name are mutually exclusive.
        required: the flag must be given (for ``exclusive``: one of the group must be).
        metavar: what ``--help`` shows as the value.
    """
    return {"flag": locals()}


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (sparsify style), inherited ones included."""
    if not dataclasses.is_dataclass(cls):
        return _own_field_docs(cls)
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
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
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or is_config_type(hints[f.name]):
            continue
        meta: dict[str, Any] = f.metadata.get("flag", {})
        target = group
        if meta.get("exclusive"):
            key = meta["exclusive"]
            if key not in exclusive:
                exclusive[key] = parser.add_mutually_exclusive_group(required=meta["required"])
            target = exclusive[key]
        if meta.get("positional"):
            target.add_argument(prefix + f.name, help=docs.get(f.name, "").replace("%", "%%"))
            continue
        flag_name = meta.get("name") or "--" + (prefix + f.name).replace("_", "-")
        target.add_argument(flag_name, **_argument(f, hints[f.name], docs, prefix, meta))
    for name, paths in flat_names_of(cls).items():
        if name not in skip:
            group.add_argument(
                "--" + (prefix + name).replace("_", "-"), **_flat_argument(cls, name, paths, prefix)
            )


def _flat_argument(cls: type, name: str, paths: tuple[str, ...], prefix: str) -> dict[str, Any]:
    """``add_argument`` keywords of a flat name: the first held field's type and docstring, the
    default the held config has in ``cls``, and where the value goes."""
    head, attr = paths[0].split(".", 1)
    outer = {f.name: f for f in dataclasses.fields(cls)}[head]
    held_cls = typing.get_type_hints(cls)[head]
    inner = {f.name: f for f in dataclasses.fields(held_cls)}[attr]
    default = getattr(field_default(outer), attr)
    tp = typing.get_type_hints(held_cls)[attr]
    kwargs = _argument(inner, tp, field_docs(held_cls), prefix, {}, default)
    kwargs["dest"] = prefix + name
    kwargs["help"] += f" [sets {', '.join(paths)}]"
    return kwargs


def _argument(
    f: dataclasses.Field[Any],
    tp: Any,
    docs: dict[str, str],
    prefix: str,
    meta: dict[str, Any],
    default: Any = dataclasses.MISSING,
) -> dict[str, Any]:
    """``add_argument`` keywords of one field (``default``: what ``--help`` shows, if not the
    field's own)."""
    if default is dataclasses.MISSING:
        default = field_default(f)
    shown = "" if meta.get("required") or meta.get("switch") else f" (default: {default!r})"
    help_text = f"{docs.get(f.name, '')}{shown}".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None, "help": help_text}
    if meta.get("required") and not meta.get("exclusive"):
        kwargs["required"] = True
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    listed = origin is list or any(get_origin(a) is list for a in args)
    if meta.get("switch"):
        kwargs["action"] = "store_true"
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(get_args(tp))
    elif listed and (meta.get("nargs") or meta.get("repeat")):
        if meta.get("repeat"):
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = meta["nargs"]
    elif listed:
        kwargs["type"] = _parse_list
        kwargs.setdefault("metavar", "A,B,...")
    elif tp in (int, float, str):
        kwargs["type"] = tp
    elif args and all(a in (int, float, str) for a in args):
        kwargs["type"] = args[0]
    else:
        kwargs["type"] = str
    return kwargs


def dataclass_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", base: Any = None
) -> Any:
    """Build ``cls`` from parsed flags; unset flags keep ``base``'s (or the default) values."""
    values = (
        {f.name: copy.deepcopy(getattr(base, f.name)) for f in dataclasses.fields(base) if f.init}
        if base is not None
        else {}
    )
    for name in [f.name for f in dataclasses.fields(cls)] + list(flat_names_of(cls)):
        v = getattr(args, prefix + name, None)
        if v is not None:
            values[name] = v
    return cls(**values)


def configs_from_args(
    args: argparse.Namespace, sections: dict[str, dict[str, Any]], classes: dict[str, type]
) -> dict[str, Any]:
    """One config per ``classes`` entry: the section's saved/file values, overridden by flags.

    ``sections`` maps a key of ``classes`` to a JSON-like dict (``{"train": {"steps": 10}}``);
    errors name the section (``train config: steps=0 is invalid; ...``).
    """
    out: dict[str, Any] = {}
    for key, cls in classes.items():
        base: Any = config_from_dict(cls, sections.get(key, {}), source=f"{key} config")
        out[key] = dataclass_from_args(cls, args, base=base)
    return out
