"""Interventions as data: ``EditSpec`` / ``InterventionSpec``, their YAML / JSON form, positions
and the checks against a model."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import yaml
from torch import Tensor

from codebook_lens.config import check_choice, check_range, config_from_dict, write_bytes_atomic
from codebook_lens.model.codebook_model import CodebookModel

Action = Literal["force", "ban"]
Slot = Literal["replace-lowest", "append"]
ACTIONS: tuple[str, ...] = get_args(Action)
SLOTS: tuple[str, ...] = get_args(Slot)
POSITION_KEYWORDS = ("all", "prompt", "generated")
_POSITIONS_HELP = (
    "choose 'all', 'prompt', 'generated', an integer, a list of integers, or a slice string "
    "like '3:10', '5:' or '-1'"
)


# ------------------------------------------------------------------ positions
@dataclass(frozen=True)
class Positions:
    """Parsed ``positions`` value: a keyword, explicit indices, or a slice (stop ``None`` = open)."""

    kind: Literal["all", "prompt", "generated", "index", "slice"]
    indices: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None
    step: int = 1

    @classmethod
    def parse(cls, value: object, *, name: str = "positions") -> Positions:
        bad = ValueError(f"{name}={value!r} is invalid; {_POSITIONS_HELP}")
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return cls("index", (value,))
        if isinstance(value, list | tuple):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise bad
            return cls("index", tuple(value))
        if not isinstance(value, str):
            raise bad
        text = value.strip()
        if text in POSITION_KEYWORDS:
            return cls(text)  # type: ignore[arg-type]
        if re.fullmatch(r"[+-]?\d+", text):
            return cls("index", (int(text),))
        parts = text.split(":")
        if 2 <= len(parts) <= 3 and all(re.fullmatch(r"\s*([+-]?\d+)?\s*", p) for p in parts):
            nums = [int(p) if p.strip() else None for p in parts]
            step = 1 if len(nums) < 3 or nums[2] is None else nums[2]
            if step < 1:
                raise ValueError(f"{name}={value!r} is invalid; a slice step must be >= 1")
            return cls("slice", start=nums[0], stop=nums[1], step=step)
        raise bad

    def mask(self, pos: Tensor, prompt_length: int) -> Tensor:
        """Boolean mask over absolute positions ``pos`` (any shape)."""
        if self.kind == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if self.kind == "prompt":
            return pos < prompt_length
        if self.kind == "generated":
            return pos >= prompt_length
        if self.kind == "index":
            idx = torch.tensor(self.resolved(prompt_length), dtype=pos.dtype, device=pos.device)
            return torch.isin(pos, idx)
        start, stop = self._bounds(prompt_length)
        m = (pos >= start) & ((pos - start) % self.step == 0)
        return m if stop is None else m & (pos < stop)

    def resolved(self, prompt_length: int) -> list[int]:
        """Explicit indices with negatives counted back from the end of the prompt."""
        return [i + prompt_length if i < 0 else i for i in self.indices]

    def _bounds(self, prompt_length: int) -> tuple[int, int | None]:
        def fix(i: int) -> int:
            return max(i + prompt_length, 0) if i < 0 else i

        start = 0 if self.start is None else fix(self.start)
        return start, None if self.stop is None else fix(self.stop)

    def check(self, prompt_length: int, length: int, *, name: str = "positions") -> None:
        """Raise unless every explicit position lies in ``0 .. length - 1``."""
        if self.kind == "index":
            for raw, i in zip(self.indices, self.resolved(prompt_length), strict=True):
                if i < 0:
                    raise ValueError(
                        f"{name}: position {raw} is before the start of the sequence; negative "
                        f"positions count back from the end of the {prompt_length}-token prompt "
                        f"(allowed: {-prompt_length} .. -1)"
                    )
                if i >= length:
                    raise ValueError(
                        f"{name}: position {raw} is past the sequence, which has {length} "
                        f"processed positions (allowed: 0 .. {length - 1})"
                    )
        elif self.kind == "slice":
            start, stop = self._bounds(prompt_length)
            if start >= length or (stop is not None and stop <= start):
                raise ValueError(
                    f"{name}: the slice selects no position of the sequence, which has {length} "
                    f"processed positions (0 .. {length - 1})"
                )


# ----------------------------------------------------------------- the spec
@dataclass
class EditSpec:
    """One edit: force or ban some codes of one codebook (or latents of an SAE) at some
    positions.

    On an SAE (codebook ``sae.<site>``), ``force`` adds ``value x W_dec[latent]`` to the
    activation at the SAE's site (steering), and ``ban`` removes the latent's contribution
    (``x - z[latent] x W_dec[latent]``, with ``z`` the SAE's encoding of ``x``).
    """

    codebook: str
    """Codebook name, e.g. 'layers.0.attn_heads', 'layers.1.mlp_out' or 'sae.transformer.h.0'."""

    codes: int | list[int]
    """Code id or list of code ids (each in 0 .. num_codes - 1); latent ids for an SAE."""

    positions: str | int | list[int] = "all"
    """'all', 'prompt', 'generated', an index, a list of indices, or a slice like '3:10'."""

    action: Action = "force"
    """'force' the codes on, or 'ban' them (the next-best codes are chosen instead)."""

    slot: Slot = "replace-lowest"
    """For 'force': overwrite the lowest-ranked chosen codes ('replace-lowest') or 'append'."""

    scale: float = 1.0
    """For 'force': weight multiplying the forced code vectors; on an SAE, the multiple of the
    latent's largest activation in a cache that ``value`` defaults to."""

    value: float | None = None
    """For 'force' on an SAE: the activation to add the latent at (``value x W_dec[latent]``);
    ``None``: ``scale`` x its largest activation in the cache (``InterventionSpec.resolved``)."""

    head: int | None = None
    """For per-head (attn_heads) codebooks: the head to edit; None edits every head."""

    def __post_init__(self) -> None:
        if not isinstance(self.codebook, str) or not self.codebook:
            raise ValueError(f"codebook={self.codebook!r} is invalid; give a codebook name")
        codes = self.codes if isinstance(self.codes, list) else [self.codes]
        if not codes or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in codes
        ):
            raise ValueError(
                f"codes={self.codes!r} is invalid; give a code id or a non-empty list of "
                "integer code ids >= 0"
            )
        if len(set(codes)) != len(codes):
            raise ValueError(f"codes={self.codes!r} is invalid; a code id is listed twice")
        self.positions_parsed  # noqa: B018 - parse now so a bad value fails at construction
        check_choice("action", self.action, ACTIONS)
        check_choice("slot", self.slot, SLOTS)
        check_range("scale", self.scale)
        for name in ("scale", "value"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{name}={v!r} is invalid; it must be a finite number")
        if self.head is not None and (
            isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0
        ):
            raise ValueError(f"head={self.head!r} is invalid; give a head index >= 0 or None")

    @property
    def code_list(self) -> list[int]:
        return list(self.codes) if isinstance(self.codes, list) else [self.codes]

    @property
    def positions_parsed(self) -> Positions:
        return Positions.parse(self.positions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 integers, so ``positions: 3:10`` stays a slice
    string instead of silently becoming the integer 190."""


_SpecLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


@dataclass
class InterventionSpec:
    """A list of edits applied together (YAML/JSON: ``{edits: [...]}`` or a bare list)."""

    edits: list[EditSpec] = field(default_factory=list)
    """The edits, applied in order (force edits fill the lowest slots first-come)."""

    def __post_init__(self) -> None:
        if not isinstance(self.edits, list) or not all(isinstance(e, EditSpec) for e in self.edits):
            raise ValueError(f"edits={self.edits!r} is invalid; give a list of EditSpec")

    def __len__(self) -> int:
        return len(self.edits)

    # ---------------------------------------------------------- formats
    def to_dict(self) -> dict[str, Any]:
        return {"edits": [e.to_dict() for e in self.edits]}

    def resolved(self, cache: Any) -> InterventionSpec:
        """A copy in which every 'force' edit of an SAE codebook of ``cache`` without a
        ``value`` gets ``scale`` x the latent's largest activation in the cache."""

        edits = []
        for e in self.edits:
            info = cache.codebooks.get(e.codebook)
            if e.action == "force" and e.value is None and info is not None and info.values:
                peaks = []
                for code in e.code_list:
                    cache.check_code(e.codebook, code)
                    pos = cache.positions(e.codebook, code)
                    row_codes = np.asarray(cache.codes(e.codebook)[pos, 0, :])
                    vals = np.asarray(cache.values(e.codebook)[pos])[row_codes == code]
                    peaks.append(float(vals.max()) if vals.size else 0.0)
                e = EditSpec(**{**asdict(e), "value": e.scale * max(peaks)})
            edits.append(e)
        return InterventionSpec(edits)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "spec") -> InterventionSpec:
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"edits"})
            if unknown:
                raise ValueError(f"{source}: unknown field(s) {unknown}; the only field is 'edits'")
            data = data.get("edits", [])
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ValueError(
                f"{source}: expected a list of edits or {{edits: [...]}}, got {type(data).__name__}"
            )
        return cls(
            [
                config_from_dict(EditSpec, e, source=f"{source}: edits[{i}]")
                for i, e in enumerate(data)
            ]
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "spec") -> InterventionSpec:
        try:
            data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: not valid YAML ({e})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "spec") -> InterventionSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InterventionSpec:
        """Read a ``.json`` file as JSON and anything else as YAML."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: intervention spec file not found") from None
        if p.suffix.lower() == ".json":
            return cls.from_json(text, source=str(p))
        return cls.from_yaml(text, source=str(p))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON (``.json``) or YAML (anything else) atomically."""
        p = Path(path)
        text = self.to_json() if p.suffix.lower() == ".json" else self.to_yaml()
        write_bytes_atomic(p, text.encode("utf-8"))
        return p

    # ------------------------------------------------------- validation
    def validate(
        self,
        model: CodebookModel,
        *,
        prompt_length: int | None = None,
        length: int | None = None,
    ) -> None:
        """Check every edit against ``model`` (names, code ids, heads, slot budget) and, when
        the lengths are known, every explicit position against the sequence."""
        saes = getattr(model, "dictionaries", {})
        known = list(model.codebooks) + list(saes)
        forced: dict[tuple[str, int], int] = {}
        excluded: dict[tuple[str, int], set[int]] = {}
        for i, e in enumerate(self.edits):
            where = f"edits[{i}]"
            if e.codebook in saes:
                _check_sae_edit(e, saes[e.codebook], where)
                if prompt_length is not None and length is not None:
                    e.positions_parsed.check(prompt_length, length, name=f"{where}: positions")
                continue
            if e.codebook not in known:
                raise ValueError(
                    f"{where}: codebook={e.codebook!r} is not a codebook of this model; "
                    f"known codebooks: {known}"
                )
            layer = model.codebooks[e.codebook]
            _check_ids(e, layer.num_codes, where, f"in codebook {e.codebook!r}", "num_codes=")
            if e.head is not None:
                if not layer.grouped:
                    raise ValueError(
                        f"{where}: head={e.head} is invalid; codebook {e.codebook!r} is not "
                        "per-head, so leave head unset"
                    )
                if e.head >= layer.groups:
                    raise ValueError(
                        f"{where}: head={e.head} is out of range; codebook {e.codebook!r} has "
                        f"{layer.groups} heads (allowed: 0 .. {layer.groups - 1})"
                    )
            heads = range(layer.groups) if e.head is None else [e.head]
            for h in heads:
                excluded.setdefault((e.codebook, h), set()).update(e.code_list)
                if e.action == "force" and e.slot == "replace-lowest":
                    n = forced.get((e.codebook, h), 0) + len(e.code_list)
                    forced[(e.codebook, h)] = n
                    if n > layer.k:
                        raise ValueError(
                            f"{where}: forcing {n} codes with slot='replace-lowest' on "
                            f"{e.codebook!r} (head {h}) exceeds its k={layer.k} slots; "
                            "force fewer codes or use slot='append'"
                        )
                if len(excluded[(e.codebook, h)]) > layer.num_codes - layer.k:
                    raise ValueError(
                        f"{where}: too many codes forced or banned on {e.codebook!r} (head {h}): "
                        f"at most num_codes - k = {layer.num_codes - layer.k} may be taken out"
                    )
            if prompt_length is not None and length is not None:
                e.positions_parsed.check(prompt_length, length, name=f"{where}: positions")


def _check_sae_edit(e: EditSpec, sae: Any, where: str) -> None:
    """Raise unless ``e`` fits the SAE ``sae`` (latent ids, no head, a value to force at)."""
    _check_ids(e, sae.num_latents, where, f"latents of SAE {e.codebook!r}", "num_latents=")
    if e.head is not None:
        raise ValueError(f"{where}: head={e.head} is invalid; an SAE has no heads")
    if e.action == "force" and e.value is None:
        raise ValueError(
            f"{where}: value=None is invalid for forcing latents of SAE {e.codebook!r}; give "
            "value (the activation to add each latent at), or resolve it from a cache "
            "(InterventionSpec.resolved(cache), --cache CACHE)"
        )


def _check_ids(e: EditSpec, size: int, where: str, of: str, what: str) -> None:
    """Raise unless every id of ``e`` is below ``size`` (the codebook's codes, the latents)."""
    bad = [c for c in e.code_list if c >= size]
    if bad:
        raise ValueError(
            f"{where}: codes={bad} are not {of}, which has {what}{size} "
            f"(allowed ids: 0 .. {size - 1})"
        )
