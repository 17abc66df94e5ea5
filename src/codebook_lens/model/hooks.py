"""Running a model with hooks: scoped eval mode, the width probe, code recording."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from codebook_lens.model.sites import HookSite, architecture_name

PROBE_SHAPE = (2, 3)
"""``(batch, seq)`` of the dummy forward pass that measures widths."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every module gets its own mode back.

    One flag is not enough: a wrapper in train mode may hold a frozen base in eval mode.
    """
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for mod, mode in modes:
            mod.training = mode


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find an activation tensor in a {type(value).__name__}")


@torch.no_grad()
def measure_widths(model: nn.Module, sites: list[HookSite]) -> None:
    """One dummy forward pass to read every site's activation width.

    Named placements must see a ``(batch, seq, width)`` tensor (an MoE that flattens tokens, or
    routed attention heads, do not) so that codes keep their documented shapes.
    """
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def record(site: HookSite) -> Any:
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any = None) -> None:
            if site.hook == "input":
                t = _first_tensor(args if args else list(kwargs.values()))
            else:
                t = _first_tensor(out)
            shapes.setdefault(site.name, tuple(t.shape))
            site.dim = int(t.shape[-1])

        return hook

    try:
        for s in sites:
            mod = modules[s.module]
            if s.hook == "input":
                handles.append(mod.register_forward_pre_hook(record(s), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(record(s), with_kwargs=True))
        device = next(model.parameters()).device
        with eval_mode(model):
            model(input_ids=torch.ones(PROBE_SHAPE, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    tokens = PROBE_SHAPE[0] * PROBE_SHAPE[1]
    for s in sites:
        if s.dim <= 0:
            raise ValueError(f"codebook {s.name}: module {s.module} did not run in a forward pass")
        shape = shapes[s.name]
        s.flat = s.layer is not None and len(shape) == 2 and shape[0] == tokens
        if s.placement != "module" and len(shape) > 3:
            # (batch, seq, groups, width): DeepSeek-V4's grouped heads and its parallel
            # residual streams; quantized as one (batch, seq, groups * width) activation.
            s.dim = math.prod(shape[2:])
        if s.placement != "module" and shape[:2] != PROBE_SHAPE and not s.flat:
            raise ValueError(
                f"codebook {s.name}: module {s.module} of {architecture_name(model)} sees a "
                f"{list(shape)} tensor for a {list(PROBE_SHAPE)} (batch, seq) input, "
                f"not (batch, seq, width); placement {s.placement!r} cannot go there. Use "
                "CodebookConfig(modules=[...globs...]) to choose another module"
            )
        if s.dim % s.groups:
            raise ValueError(
                f"codebook {s.name}: width {s.dim} does not divide into {s.groups} heads"
            )


class CodeRecording:
    """Code ids recorded by ``CodebookModel.record_codes()``, by codebook name.

    Several forward passes (e.g. generation with a KV cache) are joined along the sequence axis.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}

    def add(self, name: str, codes: Tensor) -> None:
        self._parts.setdefault(name, []).append(codes.detach())

    @property
    def codes(self) -> dict[str, Tensor]:
        """``name -> (batch, seq, [heads,] k)`` int64 code ids."""
        return {n: p[0] if len(p) == 1 else torch.cat(p, dim=1) for n, p in self._parts.items()}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._parts:
            raise KeyError(f"no codes recorded for {name!r}; recorded: {sorted(self._parts)}")
        return self.codes[name]

    def keys(self) -> list[str]:
        return list(self._parts)
