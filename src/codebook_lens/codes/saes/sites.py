"""A dictionary at a Hugging Face module: record its latents, or splice edited latents in.

Every context manager here registers one hook on the site's module and removes it in
``finally``; after the block the model computes exactly what it computed before.
Activations are whatever the module sees or returns, usually ``(batch, seq, d_in)``; a
tuple output (a block's ``(hidden, ...)``) has its first tensor read or replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from codebook_lens.codes.saes.dictionary import (
    CodebookDictionary,
    DenseDictionary,
    Dictionary,
    TopK,
)
from codebook_lens.codes.saes.saelens_adapter import SAELensDictionary
from codebook_lens.codes.saes.sparsify_adapter import SparsifyDictionary
from codebook_lens.model.codebook_model import HookSite
from codebook_lens.model.layer import CodebookLayer

EditMode = Literal["set", "add"]


def as_dictionary(obj: Any, module: str | None = None) -> Dictionary:
    """Wrap a ``CodebookLayer``, sparsify ``SparseCoder`` or SAELens ``SAE`` (or pass a
    ``Dictionary`` through)."""
    if isinstance(obj, CodebookLayer):
        return CodebookDictionary(obj, module)
    if isinstance(obj, DenseDictionary):
        return obj
    owner = type(obj).__module__.split(".")[0]
    if owner == "sparsify":
        return SparsifyDictionary(obj, hookpoint=module)
    if owner == "sae_lens":
        return SAELensDictionary(obj)
    if isinstance(obj, Dictionary):
        return obj
    raise TypeError(
        f"cannot use a {type(obj).__name__} as a dictionary; give a CodebookLayer, a sparsify "
        "SparseCoder, a SAELens SAE or an object with kind, num_latents, d_in, k, W_dec, "
        "encode, decode, top_k and site"
    )


def _swap_first(value: Any, fn: Callable[[Tensor], Tensor | None]) -> Any:
    """``fn`` on the activation in ``value`` (a tensor, or a tuple/list led by one); returns
    ``value`` with the activation replaced by ``fn``'s result, or ``None`` if it returned
    ``None``."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        new = fn(value[0])
        if new is None:
            return None
        items = [new, *value[1:]]
        return value._make(items) if hasattr(value, "_make") else type(value)(items)
    raise TypeError(f"cannot find an activation tensor in a {type(value).__name__}")


@contextlib.contextmanager
def hook_site(
    model: nn.Module, site: HookSite, fn: Callable[[Tensor], Tensor | None]
) -> Iterator[None]:
    """Call ``fn`` on the site's activation in every forward pass inside the block; a tensor it
    returns replaces the activation (same shape), ``None`` leaves it as it is."""
    module = model.get_submodule(site.module)
    if site.hook == "input":

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                new = _swap_first(args, fn)
                return None if new is None else (new, kwargs)
            key = next(iter(kwargs))  # hidden states passed by keyword
            value = fn(kwargs[key])
            return None if value is None else (args, {**kwargs, key: value})

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda mod, args, out: _swap_first(out, fn))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_activations(model: nn.Module, site: HookSite) -> Iterator[list[Tensor]]:
    """The site's activations (detached), one tensor per forward pass inside the block."""
    seen: list[Tensor] = []

    def keep(x: Tensor) -> None:
        seen.append(x.detach())

    with hook_site(model, site, keep):
        yield seen


class LatentRecording:
    """Top-k latents recorded by ``record_latents``, one ``TopK`` per forward pass."""

    def __init__(self) -> None:
        self.calls: list[TopK] = []

    def _last(self) -> TopK:
        if not self.calls:
            raise RuntimeError("no forward pass ran inside record_latents yet")
        return self.calls[-1]

    @property
    def values(self) -> Tensor:
        """Activations ``(batch, seq, k)`` of the latest forward pass."""
        return self._last().values

    @property
    def indices(self) -> Tensor:
        """Latent ids ``(batch, seq, k)`` (``-1``: fewer fired) of the latest forward pass."""
        return self._last().indices


@contextlib.contextmanager
def record_latents(
    model: nn.Module, dictionary: Any, site: HookSite | None = None, k: int | None = None
) -> Iterator[LatentRecording]:
    """Record each token's ``k`` strongest latents (``dictionary.top_k``) at ``site``
    (default ``dictionary.site(model)``) in every forward pass inside the block.

    ``dictionary`` is a ``Dictionary`` or anything ``as_dictionary`` wraps."""
    dictionary = as_dictionary(dictionary)
    site = dictionary.site(model) if site is None else site
    recording = LatentRecording()

    def record(x: Tensor) -> None:
        with torch.no_grad():
            recording.calls.append(dictionary.top_k(x, k))

    with hook_site(model, site, record):
        yield recording


@dataclass(frozen=True)
class LatentEdit:
    """A change to one latent's activation at a dictionary's site.

    ``mode='set'`` forces the latent to ``value`` (``value=0`` removes its contribution);
    ``'add'`` adds ``value`` to it, i.e. adds ``value * W_dec[latent]`` to the activation.
    """

    latent: int
    """Latent id in ``[0, num_latents)``."""
    value: float = 0.0
    """Activation to set, or to add."""
    mode: EditMode = "set"
    """'set' or 'add'."""
    positions: tuple[int, ...] | None = None
    """Sequence positions (the activation's second-to-last axis; negative counts from the
    end) to edit; ``None`` edits every token."""

    def apply(self, z: Tensor, num_latents: int) -> None:
        """Edit dense latent activations ``z`` ``(..., seq, num_latents)`` in place."""
        if not 0 <= self.latent < num_latents:
            raise ValueError(
                f"latent={self.latent} is invalid; it must be in [0, {num_latents - 1}]"
            )
        if self.mode not in ("set", "add"):
            raise ValueError(f"mode={self.mode!r} is invalid; choose 'set' or 'add'")
        pos: slice | list[int] = slice(None) if self.positions is None else list(self.positions)
        column = z[..., self.latent]  # (..., seq), a view
        target = column if z.dim() < 2 else column[..., pos]
        new = target + self.value if self.mode == "add" else torch.full_like(target, self.value)
        if z.dim() < 2:
            column.copy_(new)
        else:
            column[..., pos] = new


@contextlib.contextmanager
def splice(
    model: nn.Module,
    dictionary: Any,
    edits: Sequence[LatentEdit],
    site: HookSite | None = None,
    *,
    keep_error: bool = True,
) -> Iterator[None]:
    """Edit latents at ``site`` (default ``dictionary.site(model)``) inside the block.

    The activation ``x`` becomes ``x + decode(z_edited) - decode(z)`` with ``z = encode(x)``
    (for a linear decoder ``x + (z_edited - z) @ W_dec``): the dictionary's reconstruction
    error is kept, so with no edit the activation is unchanged. ``keep_error=False`` replaces
    ``x`` by the reconstruction ``decode(z_edited)`` itself.
    """
    dictionary = as_dictionary(dictionary)
    site = dictionary.site(model) if site is None else site
    edits = list(edits)

    def edit(x: Tensor) -> Tensor:
        with torch.no_grad():
            z = dictionary.encode(x)
            z_edited = z.clone()
            for e in edits:
                e.apply(z_edited, dictionary.num_latents)
            if not keep_error:
                return dictionary.decode(z_edited).to(x.dtype).reshape(x.shape)
            delta = dictionary.decode(z_edited) - dictionary.decode(z)
            return x + delta.to(x.dtype).reshape(x.shape)

    with hook_site(model, site, edit):
        yield
