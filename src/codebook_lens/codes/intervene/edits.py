"""Applying an ``InterventionSpec`` inside forward passes: one ``LayerEdit`` per codebook layer
and one ``LatentSteer`` hook per SAE, installed by ``intervene`` for the duration of a ``with``
block."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from codebook_lens.codes.intervene.spec import EditSpec, InterventionSpec, Positions
from codebook_lens.codes.saes.sites import hook_site
from codebook_lens.model.codebook_model import CodebookModel, HookSite
from codebook_lens.model.kv_cache import find_cache_length
from codebook_lens.model.layer import CodebookLayer


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


class LatentSteer:
    """Every edit aimed at one SAE: a function of the activation at its site ``(..., seq, d)``.

    ``force`` adds ``value x W_dec[latent]`` at the edit's positions; ``ban`` subtracts the
    latent's own contribution there, ``z[latent] x W_dec[latent]`` with ``z = encode(x)``.
    """

    def __init__(self, sae: Any, edits: list[EditSpec], cursor: _Cursor) -> None:
        self.sae, self.edits, self.cursor = sae, edits, cursor

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1])
            pos = self.cursor.positions(tuple(x.shape[:-1]), x.device)
            w_dec = self.sae.W_dec
            delta = torch.zeros(flat.shape, dtype=w_dec.dtype, device=x.device)
            z = None
            for e in self.edits:
                mask = e.positions_parsed.mask(pos, self.cursor.prompt_length)  # (N,)
                rows = w_dec[torch.tensor(e.code_list, device=w_dec.device)]  # (m, d)
                if e.action == "force":
                    assert e.value is not None  # checked by InterventionSpec.validate
                    change = (e.value * rows.sum(0)).expand_as(delta)
                else:
                    z = self.sae.encode(flat) if z is None else z
                    change = -(z[:, e.code_list].to(w_dec.dtype) @ rows)
                delta = delta + torch.where(mask[:, None], change, torch.zeros_like(change))
            return (flat + delta.to(x.dtype)).reshape(x.shape)


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
    saes = getattr(model, "dictionaries", {})
    by_layer: dict[str, list[EditSpec]] = {}
    by_sae: dict[str, list[EditSpec]] = {}
    for e in spec.edits:
        (by_sae if e.codebook in saes else by_layer).setdefault(e.codebook, []).append(e)
    busy = [n for n in by_layer if model.codebooks[n].edit is not None]
    if busy:
        raise ValueError(f"an intervention is already active on codebook(s) {busy}")
    if not by_layer and not by_sae:
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
        with contextlib.ExitStack() as stack:
            for name, edits in by_layer.items():
                layer = model.codebooks[name]
                layer.edit = LayerEdit(layer, edits, cursor)
                installed.append(layer)
            sites: dict[str, HookSite] = getattr(model, "dictionary_sites", {})
            for name, edits in by_sae.items():
                steer = LatentSteer(saes[name], edits, cursor)
                stack.enter_context(hook_site(model.base, sites[name], steer))
            yield spec
    finally:
        handle.remove()
        for layer in installed:
            layer.edit = None
