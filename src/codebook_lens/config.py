"""Shared pieces of every stage: the version, value checks, typed JSON configs, atomic writes.

Each config dataclass is the Python API, the CLI flags and the saved JSON. A config that holds
others (an experiment's ``lm: ModelConfig``, ``pretrain: TrainConfig``, ...) may give some of
their fields flat names (``flat_names``), which work as keywords, attributes and flags.

Every field has a docstring under it (shown in ``--help``); invalid values raise
``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import types
import typing
from collections.abc import Callable, Iterator
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
    flat = flat_names_of(cls)
    unknown = sorted(set(data) - set(fields) - set(flat))
    if unknown:
        raise ValueError(
            f"{source}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}"
        )
    data = dict(data)
    for name, value in data.items():
        if name in flat:  # the held config checks it
            continue
        if is_config_type(hints[name]) and isinstance(value, dict):
            data[name] = config_from_dict(hints[name], value, source=f"{source}: {name}")
        elif get_origin(hints[name]) is Literal:
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


FlatNames = dict[str, tuple[str, ...]]


def flat_names(**names: str | tuple[str, ...]) -> Callable[[type[T]], type[T]]:
    """Flat names for fields of the configs a dataclass holds (apply it over ``@dataclass``).

    ``@flat_names(lm=("width", "heads"), lr=("pretrain.lr", "finetune.lr"), steps="pretrain.
    steps")`` on a config with the fields ``lm``, ``pretrain`` and ``finetune``: a held config's
    name with a tuple of its fields gives them flat names of their own (``width`` is
    ``lm.width``); any other name stands for the dotted paths given, one or several. Then
    ``Cfg(width=64, lr=1e-3)`` sets them, ``cfg.width`` reads ``cfg.lm.width`` and
    ``cfg.lr = 3e-3`` writes both learning rates (each through ``dataclasses.replace``, so the
    held config checks the value); ``flags`` turns each name into a flag. The held configs stay
    the only storage: ``asdict``, ``replace`` and the saved JSON see just them.
    """

    def wrap(cls: type[T]) -> type[T]:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        table: FlatNames = {}
        for key, value in names.items():
            if key in fields and isinstance(value, tuple) and not any("." in v for v in value):
                table.update({attr: (f"{key}.{attr}",) for attr in value})
            else:
                table[key] = (value,) if isinstance(value, str) else tuple(value)
        for name, paths in table.items():
            heads = {p.split(".", 1)[0] for p in paths}
            if name in fields or not heads <= set(fields) or any("." not in p for p in paths):
                raise TypeError(f"{cls.__name__}: flat name {name!r} -> {paths} is invalid")
            setattr(cls, name, property(_flat_getter(paths[0]), _flat_setter(name, paths)))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            changes: dict[str, dict[str, Any]] = {}
            given: dict[str, str] = {}  # "head.attr" -> the flat name it was given as
            for name in [n for n in kwargs if n in table]:
                value = kwargs.pop(name)
                for path in table[name]:
                    head, attr = path.split(".", 1)
                    changes.setdefault(head, {})[attr] = value
                    given[path] = name
            for head, values in changes.items():
                held = kwargs[head] if head in kwargs else field_default(fields[head])
                try:
                    kwargs[head] = dataclasses.replace(held, **values)
                except ValueError as e:
                    raise ValueError(_flat_message(str(e), head, given)) from None
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__flat_names__ = table  # type: ignore[attr-defined]
        return cls

    return wrap


def flat_names_of(cls: Any) -> FlatNames:
    """The ``flat_names`` table of a config class or instance (empty when it has none)."""
    return dict(getattr(cls, "__flat_names__", {}))


def _flat_message(message: str, head: str, given: dict[str, str]) -> str:
    """A held config's error in the flat name the value was given as (``warmup_steps=-1 ...``
    -> ``base_warmup_steps=-1 ...``)."""
    for path, name in given.items():
        attr = path.split(".", 1)[1]
        if path.startswith(head + ".") and message.startswith(attr + "="):
            return name + message[len(attr) :]
    return message


def is_config_type(tp: Any) -> bool:
    """Whether a field annotation is a dataclass type (a held config)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default value (a fresh one from its factory); None if it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flat_getter(path: str) -> Callable[[Any], Any]:
    head, attr = path.split(".", 1)
    return lambda self: getattr(getattr(self, head), attr)


def _flat_setter(name: str, paths: tuple[str, ...]) -> Callable[[Any, Any], None]:
    def set_all(self: Any, value: Any) -> None:
        for path in paths:
            head, attr = path.split(".", 1)
            try:
                setattr(self, head, dataclasses.replace(getattr(self, head), **{attr: value}))
            except ValueError as e:
                raise ValueError(_flat_message(str(e), head, {path: name})) from None

    return set_all


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
