"""The smallest interface a dictionary offers: codebooks and foreign sparse autoencoders alike.

A dictionary maps an activation ``x`` ``(..., d_in)`` to latent activations ``z``
``(..., num_latents)`` (non-zero = fired) and back (``decode(z)``, for linear decoders
``z @ W_dec + b``). SAELens's synthetic-data evaluator asks for no more than ``eval()``,
``W_dec``, ``encode`` and ``decode``; the code cache also needs ``top_k`` (the fired latents of
each token as ids and values, a fixed width ``k``), ``num_latents`` and ``kind``, and the hooks
need ``site(model)``: where in a Hugging Face model the dictionary reads.

Kinds: ``"codebook"``, ``"sparsify_topk"`` / ``"sparsify_groupmax"``, ``"saelens_<arch>"`` with
the architecture the SAE was trained as (``saelens_batchtopk``, ``saelens_matryoshka``,
``saelens_topk``, ``saelens_jumprelu``, ``saelens_standard``, ...).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from codebook_lens.model.codebook_model import HookSite
from codebook_lens.model.layer import CodebookLayer

EXTRA_HINT = "pip install codebook-lens[saes]"


class TopK(NamedTuple):
    """The ``k`` strongest latents of each token, strongest first."""

    values: Tensor
    """``(..., k)`` activations; ``0`` where fewer than ``k`` latents fired."""
    indices: Tensor
    """``(..., k)`` latent ids (int64); ``-1`` where fewer than ``k`` latents fired."""


@runtime_checkable
class Dictionary(Protocol):
    """What every dictionary offers (codebooks, sparsify and SAELens SAEs)."""

    kind: str
    """``"codebook"``, ``"sparsify_topk"``, ``"saelens_batchtopk"``, ... (see the module doc)."""
    num_latents: int
    """Latents (codes, SAE features)."""
    d_in: int
    """Width of the activation it reads."""
    k: int | None
    """Latents each token fires when that is fixed (codebooks, TopK SAEs), else ``None``."""

    @property
    def W_dec(self) -> Tensor:
        """Decoder rows ``(num_latents, d_in)``."""
        ...

    def eval(self) -> Any: ...

    def encode(self, x: Tensor) -> Tensor:
        """``(..., d_in)`` -> latent activations ``(..., num_latents)``."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Latent activations ``(..., num_latents)`` -> reconstruction ``(..., d_in)``."""
        ...

    def top_k(self, x: Tensor, k: int | None = None) -> TopK:
        """The ``k`` (default ``self.k``) strongest latents of each token ``(..., k)``."""
        ...

    def site(self, model: nn.Module) -> HookSite:
        """Where in ``model`` (a Hugging Face causal LM) this dictionary reads."""
        ...


def require(module: str, what: str) -> ModuleType:
    """Import an optional peer package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed ({e}); install the extra: {EXTRA_HINT}"
        ) from e


def top_k_of(z: Tensor, k: int) -> TopK:
    """The ``k`` largest non-zero entries of dense latent activations ``z`` ``(..., n)``.

    Ranked by magnitude, so negative activations (AbsTopK SAEs) count as fired.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= z.shape[-1]:
        raise ValueError(f"k={k!r} is invalid; it must be an integer in [1, {z.shape[-1]}]")
    _, idx = z.abs().topk(k, dim=-1)
    values = z.gather(-1, idx)
    return TopK(values, idx.masked_fill(values == 0, -1))


def resolve_k(k: int | None, default: int | None, kind: str) -> int:
    """``k`` if given, else the dictionary's own; an error when neither exists."""
    if k is not None:
        return k
    if default is None:
        raise ValueError(
            f"k=None is invalid for a {kind!r} dictionary: its tokens fire a varying number "
            "of latents; pass k (the number of latents to keep per token)"
        )
    return default


class DenseDictionary(nn.Module):
    """Base of the adapters: ``top_k`` from the dense ``encode``; subclasses set the fields."""

    kind: str
    num_latents: int
    d_in: int
    k: int | None

    def top_k(self, x: Tensor, k: int | None = None) -> TopK:
        """The ``k`` (default ``self.k``) strongest latents of each token ``(..., k)``."""
        with torch.no_grad():
            return top_k_of(self.encode(x), resolve_k(k, self.k, self.kind))

    @property
    def W_dec(self) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def site(self, model: nn.Module) -> HookSite:
        raise NotImplementedError


class CodebookDictionary(DenseDictionary):
    """A ``CodebookLayer`` as a dictionary; ``module`` is the HF module whose output it reads.

    Latent ``g * num_codes + c`` is code ``c`` of head ``g`` (see ``CodebookLayer.encode``);
    ``top_k`` gives the ``groups * k`` chosen codes of each token, head by head, in id order
    within a head (all chosen codes have the same activation).
    """

    def __init__(self, layer: CodebookLayer, module: str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.module = module
        self.kind = "codebook"
        self.num_latents = layer.groups * layer.num_codes
        self.d_in = layer.dim
        self.k = layer.groups * layer.k

    @property
    def W_dec(self) -> Tensor:
        return self.layer.W_dec

    def encode(self, x: Tensor) -> Tensor:
        return self.layer.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.layer.decode(z)

    @torch.no_grad()
    def top_k(self, x: Tensor, k: int | None = None) -> TopK:
        if k not in (None, self.k):
            raise ValueError(
                f"k={k!r} is invalid for a codebook: it chooses k={self.layer.k} codes per head "
                f"x {self.layer.groups} heads = {self.k}; pass k=None or k={self.k}"
            )
        z = self.layer.encode(x)
        lead, g, c = z.shape[:-1], self.layer.groups, self.layer.num_codes
        zg = z.reshape(-1, g, c)
        values, idx = zg.topk(self.layer.k, dim=-1)  # (N, G, k): the chosen codes
        idx = idx.sort(-1).values + torch.arange(g, device=idx.device).view(1, -1, 1) * c
        idx = idx.masked_fill(values == 0, -1)  # slices skipped for NaN/inf input
        total = g * self.layer.k
        return TopK(values.reshape(*lead, total), idx.reshape(*lead, total))

    def site(self, model: nn.Module) -> HookSite:
        if self.module is None:
            raise ValueError(
                "module=None: this codebook dictionary was made without the HF module it "
                "reads; pass CodebookDictionary(layer, module='transformer.h.0') (a path in "
                "model.named_modules())"
            )
        return module_site(model, self.module, self.module)


def module_site(model: nn.Module, name: str, path: str) -> HookSite:
    """A site reading the output of module ``path``; an error listing nearby names if absent."""
    names = [n for n, _ in model.named_modules() if n]
    if path not in names:
        near = difflib.get_close_matches(path, names, n=5, cutoff=0.4) or names[:8]
        raise ValueError(f"module {path!r} (for {name!r}) is not in the model; nearby: {near}")
    return HookSite(name, path, "output", "module", None)
