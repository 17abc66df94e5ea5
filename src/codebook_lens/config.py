"""Shared pieces of every stage: the version, value checks, typed JSON configs, atomic writes.

Each config dataclass is the Python API, the CLI flags and the saved JSON.

Every field has a docstring under it (shown in ``--help``); invalid values raise
``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

__version__ = "0.1.0"


def choices_text(values: tuple[Any, ...]) -> str:
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def check_choice(name: str, value: object, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str | int | float | bool | None) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; choose {choices_text(allowed)}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is invalid; it must be a number")
    if value != value:  # NaN
        raise ValueError(f"{name}={value!r} is invalid; it must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(p for p in (lo, hi) if p)
        raise ValueError(f"{name}={value!r} is invalid; it must be {allowed}")


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")


T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose runtime check of a JSON value against a dataclass field annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def config_from_dict(cls: type[T], data: Any, *, source: str = "config") -> T:
    """Build dataclass ``cls`` from a JSON object, naming the source and field on any error."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}"
        )
    for name, value in data.items():
        if get_origin(hints[name]) is Literal:
            check_choice(f"{source}: {name}", value, tuple(get_args(hints[name])))
        elif not _type_ok(value, hints[name]):
            raise ValueError(
                f"{source}: field {name!r} has value {value!r} of the wrong type; "
                f"expected {hints[name]}"
            )
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (UTF-8, a final newline) with ``write_bytes_atomic``."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; errors name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def replace_dir_atomic(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a temporary folder inside the block; on success it replaces the folder ``path``.

    The block writes into the yielded folder (a hidden sibling of ``path``). If the block
    raises, the temporary folder is removed and ``path`` is left as it was; an existing
    ``path`` is only moved aside for the swap and deleted once the new folder is in place.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
