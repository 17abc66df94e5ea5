"""Interventions as data: force or ban codes during a forward pass or generation, then restore.

An ``InterventionSpec`` is a list of ``EditSpec``s, loadable from YAML or JSON::

    edits:
      - codebook: layers.0.attn_heads
        codes: [12, 40]          # one id or a list
        head: 2                  # grouped (per-head) codebooks only; omit for every head
        positions: generated     # all | prompt | generated | 5 | [0, 3] | "3:10" | "-1"
        action: force            # force | ban
        slot: replace-lowest     # force: overwrite the lowest-ranked codes, or append
        scale: 1.0               # force: weight of the forced code vectors

``intervene(model, spec)`` installs the edits on the codebook layers (``CodebookLayer.edit``)
for the duration of a ``with`` block and always removes them, so logits after the block are
bit-identical to before. ``run_with_codes``, ``generate`` and ``ablate`` are built on it.

How an edit acts on one token's codes (per head), with ``k`` codes chosen normally:

- ``ban``: the banned codes' scores are set to ``-inf`` before top-k, so the next-best codes
  are chosen instead.
- ``force`` with ``slot='replace-lowest'``: the forced codes are taken out of the ranking, the
  top ``k`` of the remaining codes are chosen, then the lowest-ranked ones are overwritten by
  the forced codes: the token ends up with the forced codes plus its ``k - m`` best others.
- ``force`` with ``slot='append'``: the forced codes are added after the token's ``k`` best
  others. A codebook with append edits returns ``k + m`` codes at every position; tokens
  outside the edit's positions repeat their last code there with weight 0 (no effect).

Positions are absolute token positions in the sequence (prompt first). During generation with a
KV cache each forward pass sees only new tokens; a hook on the base model reads the cache
length before every pass, so position ``p`` means the same token with or without a cache.
Negative indices count back from the end of the prompt (in ``run_with_codes`` the prompt is the
whole input); a slice with no stop (``"3:"``) runs on through every generated token.
Batches are assumed unpadded (every row starts at position 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from codebook_lens.config import check_choice, check_range, config_from_dict
from codebook_lens.model.codebook_model import CodebookModel, eval_mode
from codebook_lens.model.kv_cache import cache_kwargs, find_cache_length, output_cache
from codebook_lens.model.layer import CodebookLayer

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
    """One edit: force or ban some codes of one codebook at some positions."""

    codebook: str
    """Codebook name, e.g. 'layers.0.attn_heads' or 'layers.1.mlp_out'."""

    codes: int | list[int]
    """Code id or list of code ids (each in 0 .. num_codes - 1)."""

    positions: str | int | list[int] = "all"
    """'all', 'prompt', 'generated', an index, a list of indices, or a slice like '3:10'."""

    action: Action = "force"
    """'force' the codes on, or 'ban' them (the next-best codes are chosen instead)."""

    slot: Slot = "replace-lowest"
    """For 'force': overwrite the lowest-ranked chosen codes ('replace-lowest') or 'append'."""

    scale: float = 1.0
    """For 'force': weight multiplying the forced code vectors."""

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
        if not math.isfinite(self.scale):
            raise ValueError(f"scale={self.scale!r} is invalid; it must be a finite number")
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
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
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
        known = list(model.codebooks)
        forced: dict[tuple[str, int], int] = {}
        excluded: dict[tuple[str, int], set[int]] = {}
        for i, e in enumerate(self.edits):
            where = f"edits[{i}]"
            if e.codebook not in known:
                raise ValueError(
                    f"{where}: codebook={e.codebook!r} is not a codebook of this model; "
                    f"known codebooks: {known}"
                )
            layer = model.codebooks[e.codebook]
            bad = [c for c in e.code_list if c >= layer.num_codes]
            if bad:
                raise ValueError(
                    f"{where}: codes={bad} are not in codebook {e.codebook!r}, which has "
                    f"num_codes={layer.num_codes} (allowed ids: 0 .. {layer.num_codes - 1})"
                )
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


# ------------------------------------------------------------ layer edits
class _Cursor:
    """Where the current forward pass starts in the sequence, shared by a model's edits."""

    def __init__(self, prompt_length: int | None) -> None:
        self.offset = 0
        self.fixed_prompt = prompt_length is not None
        self.prompt_length = prompt_length or 0

    def positions(self, lead_shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Absolute position of every flattened token row ``(N,)``."""
        seq = lead_shape[-1] if lead_shape else 1
        n = math.prod(lead_shape)
        return self.offset + torch.arange(n, device=device) % seq


@dataclass
class _Compiled:
    spec: EditSpec
    positions: Positions
    codes: Tensor
    """(m,) int64 code ids."""
    heads: Tensor
    """(groups,) bool: heads the edit touches."""


class LayerEdit:
    """The ``CodeEdit`` installed on one codebook layer: every edit aimed at it."""

    def __init__(self, layer: CodebookLayer, edits: list[EditSpec], cursor: _Cursor) -> None:
        device = layer.codebook.device
        self.layer, self.cursor = layer, cursor
        self.edits: list[_Compiled] = []
        for e in edits:
            heads = torch.zeros(layer.groups, dtype=torch.bool, device=device)
            heads[slice(None) if e.head is None else e.head] = True
            codes = torch.tensor(e.code_list, dtype=torch.int64, device=device)
            self.edits.append(_Compiled(e, e.positions_parsed, codes, heads))
        self.appended = sum(len(c.spec.code_list) for c in self.edits if self._is_append(c))
        self.any_force = any(c.spec.action == "force" for c in self.edits)

    @staticmethod
    def _is_append(c: _Compiled) -> bool:
        return c.spec.action == "force" and c.spec.slot == "append"

    def _mask(self, c: _Compiled, pos: Tensor) -> Tensor:
        """(N, groups) bool: token rows and heads the edit applies to."""
        return c.positions.mask(pos, self.cursor.prompt_length)[:, None] & c.heads[None, :]

    def edit_scores(self, scores: Tensor, rows: slice, lead_shape: tuple[int, ...]) -> Tensor:
        """Take banned and forced codes out of the ranking: scores ``(groups, n, C)``."""
        pos = self.cursor.positions(lead_shape, scores.device)[rows]
        for c in self.edits:
            take = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            take[c.codes] = True
            where = self._mask(c, pos).transpose(0, 1)  # (groups, n)
            scores = scores.masked_fill(where[:, :, None] & take[None, None, :], float("-inf"))
        return scores

    def edit_codes(
        self, codes: Tensor, lead_shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor | None]:
        """Write the forced codes in: ``(N, groups, k)`` -> ``(N, groups, k')`` and weights."""
        if not self.any_force:
            return codes, None
        n, g, k = codes.shape
        pos = self.cursor.positions(lead_shape, codes.device)
        weights = torch.ones(n, g, k, device=codes.device)
        filled = torch.zeros(n, g, dtype=torch.int64, device=codes.device)
        slots = torch.arange(k, device=codes.device)
        extra_codes = codes[:, :, k - 1 :].expand(n, g, self.appended).clone()
        extra_weights = torch.zeros(n, g, self.appended, device=codes.device)
        col = 0
        for c in self.edits:
            if c.spec.action != "force":
                continue
            m = self._mask(c, pos)  # (N, G)
            for code in c.spec.code_list:
                if c.spec.slot == "append":
                    extra_codes[:, :, col] = torch.where(m, code, extra_codes[:, :, col])
                    extra_weights[:, :, col] = torch.where(m, c.spec.scale, 0.0)
                    col += 1
                else:
                    # Fill from the lowest-ranked slot upwards (codes are sorted best first).
                    sel = m[:, :, None] & (slots == (k - 1 - filled)[:, :, None])
                    codes = torch.where(sel, code, codes)
                    weights = torch.where(sel, c.spec.scale, weights)
                    filled = filled + m.long()
        if self.appended:
            codes = torch.cat([codes, extra_codes], dim=-1)
            weights = torch.cat([weights, extra_weights], dim=-1)
        return codes, weights


@contextlib.contextmanager
def intervene(
    model: CodebookModel,
    spec: InterventionSpec | None,
    *,
    prompt_length: int | None = None,
    length: int | None = None,
) -> Iterator[InterventionSpec]:
    """Apply ``spec`` to every forward pass of ``model`` inside the block.

    ``prompt_length`` separates 'prompt' from 'generated' positions and anchors negative
    indices; left ``None``, every forward pass that starts a sequence (no cache) sets it to its
    own length. ``length`` (processed positions), when given with ``prompt_length``, lets
    explicit positions be checked before anything runs. The edits are removed on exit even on
    error, so logits afterwards are bit-identical to before.
    """
    spec = InterventionSpec() if spec is None else spec
    if prompt_length is not None and prompt_length < 1:
        raise ValueError(f"prompt_length={prompt_length} is invalid; it must be >= 1")
    spec.validate(model, prompt_length=prompt_length, length=length)
    by_layer: dict[str, list[EditSpec]] = {}
    for e in spec.edits:
        by_layer.setdefault(e.codebook, []).append(e)
    busy = [n for n in by_layer if model.codebooks[n].edit is not None]
    if busy:
        raise ValueError(f"an intervention is already active on codebook(s) {busy}")
    if not by_layer:
        yield spec
        return

    cursor = _Cursor(prompt_length)

    def track(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cursor.offset = find_cache_length(args, kwargs)
        if cursor.offset == 0 and not cursor.fixed_prompt:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            if isinstance(ids, Tensor):
                cursor.prompt_length = int(ids.shape[-1])
            elif isinstance(embeds, Tensor):
                cursor.prompt_length = int(embeds.shape[1])
        if cursor.prompt_length:
            for i, e in enumerate(spec.edits):
                p = e.positions_parsed
                if p.kind == "index" and min(p.resolved(cursor.prompt_length)) < 0:
                    p.check(cursor.prompt_length, 1 << 62, name=f"edits[{i}]: positions")

    handle = model.base.register_forward_pre_hook(track, with_kwargs=True)
    installed: list[CodebookLayer] = []
    try:
        for name, edits in by_layer.items():
            layer = model.codebooks[name]
            layer.edit = LayerEdit(layer, edits, cursor)
            installed.append(layer)
        yield spec
    finally:
        handle.remove()
        for layer in installed:
            layer.edit = None


# ------------------------------------------------------------------- APIs
class RunResult(NamedTuple):
    """Result of ``run_with_codes``."""

    logits: Tensor
    """``(batch, seq, vocab)``."""
    codes: dict[str, Tensor]
    """``name -> (batch, seq, [heads,] k')`` code ids actually used (after the edits)."""


def _as_ids(input_ids: Tensor | Sequence[int], device: torch.device) -> Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[-1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(ids.shape)} are invalid; give (seq,) or (batch, seq) "
            "with seq >= 1"
        )
    return ids


@torch.no_grad()
def run_with_codes(
    model: CodebookModel,
    input_ids: Tensor | Sequence[int],
    spec: InterventionSpec | None = None,
    *,
    prompt_length: int | None = None,
    **forward_kwargs: Any,
) -> RunResult:
    """One forward pass with ``spec`` applied; returns logits and the codes used.

    ``prompt_length`` (default: the whole input) splits 'prompt' from 'generated' positions.
    """
    ids = _as_ids(input_ids, _device(model))
    seq = ids.shape[-1]
    prompt_length = seq if prompt_length is None else prompt_length
    if not 1 <= prompt_length <= seq:
        raise ValueError(f"prompt_length={prompt_length} is invalid; it must be in 1 .. {seq}")
    with (
        intervene(model, spec, prompt_length=prompt_length, length=seq),
        model.record_codes() as rec,
    ):
        out = model(input_ids=ids, **forward_kwargs)
    return RunResult(out.logits, rec.codes)


class Generation(NamedTuple):
    """One sampled continuation."""

    ids: list[int]
    """New token ids (without the prompt; stops before the end-of-sequence token)."""
    text: str | None
    """The new tokens decoded (``None`` without a tokenizer)."""


def _device(model: CodebookModel) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: CodebookModel) -> int | None:
    get = getattr(model.base, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, torch.nn.Embedding) else None


def _context_length(model: CodebookModel) -> int | None:
    """Longest sequence the model can take (learned positions), or None if unbounded/unknown."""
    cfg = getattr(model.base, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: CodebookModel, tokenizer: Any) -> set[int]:
    eos: Any = getattr(getattr(model.base, "config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | Tensor) -> list[int]:
    """Token ids of a prompt given as text (needs ``tokenizer``) or ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is text but tokenizer=None; pass a tokenizer or token ids")
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
            ids = [int(tokenizer.bos_token_id)]
    else:
        ids = [int(i) for i in torch.as_tensor(prompt).reshape(-1).tolist()]
    if not ids:
        raise ValueError(f"prompt={prompt!r} is invalid; it encodes to no tokens")
    return ids


def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Mask logits ``(batch, vocab)`` outside the top-k / nucleus."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # the likeliest token always stays (a tiny top_p rounds to 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: CodebookModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | Tensor,
    spec: InterventionSpec | None = None,
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[Generation]:
    """Sample ``num_samples`` continuations of ``prompt`` with ``spec`` applied.

    A plain sampling loop over the KV cache (``temperature=0`` is greedy). The same ``seed``
    gives the same random draws with and without a spec, so samples pair up for comparison.
    """
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} is invalid; it must be an integer >= 1"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; it must be an integer >= 1")
    check_range("temperature", temperature, 0.0)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid; it must be an integer >= 1 or None")
    if top_p is not None:
        check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    device = _device(model)
    prompt_ids = encode_prompt(tokenizer, prompt)
    vocab = _vocab_size(model)
    if vocab is not None and not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(
            f"prompt token ids {prompt_ids} are invalid; ids must be in 0 .. {vocab - 1}"
        )
    plen = len(prompt_ids)
    context = _context_length(model)
    if context is not None and plen + max_new_tokens > context:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is invalid for a {plen}-token prompt: the model's "
            f"context is {context} tokens, so it must be <= {max(context - plen, 0)}"
        )
    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    new = torch.empty(num_samples, 0, dtype=torch.long, device=device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    with (
        eval_mode(model),  # each module's own mode comes back afterwards
        intervene(model, spec, prompt_length=plen, length=plen + max_new_tokens - 1),
    ):
        past: Any = None
        step_ids = ids
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, **cache_kwargs(model, past))
            past = output_cache(out)
            logits = out.logits[:, -1].float()
            scaled = logits / temperature if temperature else logits
            if temperature == 0 or bool((scaled.isnan() | scaled.isposinf()).any()):
                # 0, or so close to 0 that the scaled logits overflow: the greedy limit
                nxt = logits.argmax(-1)
            else:
                scaled = _filter_logits(scaled, top_k, top_p)
                nxt = torch.multinomial(scaled.softmax(-1), 1, generator=gen)[:, 0]
            new = torch.cat([new, nxt[:, None]], dim=1)
            if eos:
                done |= torch.isin(nxt, eos_t)
                if bool(done.all()):
                    break
            step_ids = nxt[:, None]
    results = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        row = row[:cut]
        text = None if tokenizer is None else tokenizer.decode(row, skip_special_tokens=True)
        results.append(Generation(row, text))
    return results


class Ablation(NamedTuple):
    """Result of ``ablate``: next-token loss on the chosen tokens without and with the spec."""

    loss_before: float
    """Mean cross-entropy (nats) of the chosen tokens, unedited."""
    loss_after: float
    """The same with the spec applied."""
    delta: float
    """``loss_after - loss_before``."""
    tokens: int
    """Number of chosen tokens."""
    token_delta: Tensor
    """``(batch, seq)`` per-token loss change; NaN where not chosen (and at position 0)."""


@torch.no_grad()
def ablate(
    model: CodebookModel,
    input_ids: Tensor | Sequence[int],
    spec: InterventionSpec,
    target_mask: Tensor | None = None,
) -> Ablation:
    """Loss change on chosen tokens when ``spec`` is applied (e.g. codes banned).

    ``target_mask`` ``(batch, seq)`` bool marks the tokens whose prediction is scored (the
    loss of predicting token ``t`` from tokens ``< t``); position 0 has no prediction and is
    ignored. ``None`` scores every token from position 1 on.
    """
    ids = _as_ids(input_ids, _device(model))
    if ids.shape[-1] < 2:
        raise ValueError("input_ids need at least 2 tokens to measure a next-token loss")
    if target_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(target_mask, device=ids.device)
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(
                f"target_mask has shape {tuple(mask.shape)}; it must match input_ids "
                f"{tuple(ids.shape)}"
            )
        mask = mask.bool()
    mask = mask.clone()
    mask[:, 0] = False
    if not bool(mask.any()):
        raise ValueError("target_mask chooses no token after position 0; nothing to score")

    def token_loss(s: InterventionSpec | None) -> Tensor:
        logits = run_with_codes(model, ids, s).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return F.pad(ce, (1, 0), value=float("nan"))  # (batch, seq), NaN at position 0

    before, after = token_loss(None), token_loss(spec)
    lb, la = float(before[mask].mean()), float(after[mask].mean())
    delta = torch.where(mask, after - before, torch.full_like(after, float("nan")))
    return Ablation(lb, la, la - lb, int(mask.sum()), delta)


# -------------------------------------------------------------------- CLI
def load_model_and_tokenizer(
    path: str | os.PathLike[str], *, device: str | None = None
) -> tuple[CodebookModel, Any]:
    """A saved codebook model and its tokenizer (``None`` if none was saved with it)."""
    from transformers import AutoTokenizer

    model = CodebookModel.from_pretrained(path, device=device)
    model.eval()
    local = Path(path)
    if local.is_dir() and not any(
        (local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def compare(
    model: CodebookModel,
    tokenizer: Any,
    prompt: str | Sequence[int],
    spec: InterventionSpec | None,
    *,
    num_samples: int = 5,
    **sampling: Any,
) -> tuple[list[Generation], list[Generation]]:
    """Unsteered and steered samples from the same prompt and seed (paired draws)."""
    plain = generate(model, tokenizer, prompt, None, num_samples=num_samples, **sampling)
    steered = (
        generate(model, tokenizer, prompt, spec, num_samples=num_samples, **sampling)
        if spec is not None and len(spec)
        else []
    )
    return plain, steered


def _show(g: Generation) -> str:
    return g.text if g.text is not None else " ".join(map(str, g.ids))


def format_side_by_side(
    prompt: str, plain: list[Generation], steered: list[Generation], width: int = 100
) -> str:
    """Samples as two wrapped columns (unsteered | steered), or one column without a spec."""
    import textwrap

    lines = [f"prompt: {prompt!r}"]
    if not steered:
        lines.append("unsteered (no --intervene spec given):")
        for i, g in enumerate(plain, 1):
            body = textwrap.wrap(_show(g).replace("\n", " "), max(width - 5, 20)) or [""]
            lines += [f"{i:>3}  {body[0]}"] + [f"     {b}" for b in body[1:]]
        return "\n".join(lines)
    col = max((width - 8) // 2, 20)
    lines.append(f"{'':>3}  {'unsteered':<{col}} | steered")
    lines.append(f"{'':>3}  {'-' * col}-+-{'-' * col}")
    for i, (a, b) in enumerate(zip(plain, steered, strict=True), 1):
        left = textwrap.wrap(_show(a).replace("\n", " "), col) or [""]
        right = textwrap.wrap(_show(b).replace("\n", " "), col) or [""]
        for j in range(max(len(left), len(right))):
            num = f"{i:>3}" if j == 0 else "   "
            lt = left[j] if j < len(left) else ""
            rt = right[j] if j < len(right) else ""
            lines.append(f"{num}  {lt:<{col}} | {rt}")
    return "\n".join(lines)


def parse_prompt(tokenizer: Any, prompt: str) -> str | list[int]:
    """Text for a model with a tokenizer; without one, whitespace-separated token ids."""
    if tokenizer is not None:
        return prompt
    parts = prompt.split()
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(
            f"prompt={prompt!r} is invalid: the model has no saved tokenizer, so give token ids "
            "separated by spaces (e.g. '0 12 7'), or save the model with "
            "save_pretrained(dir, tokenizer=...)"
        )
    return [int(p) for p in parts]
