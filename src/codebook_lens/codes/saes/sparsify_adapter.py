"""EleutherAI sparsify sparse autoencoders as dictionaries (``pip install codebook-lens[saes]``).

sparsify saves one folder per hookpoint (``cfg.json`` + ``sae.safetensors``) inside a run
folder. A hookpoint is a module path inside ``model.base_model`` (``h.0`` for GPT-2,
``layers.0`` for Llama) whose output the SAE reads; in the causal LM that module is
``<base_model_prefix>.<hookpoint>`` (``transformer.h.0``, ``model.layers.0``).

Transcoders (``transcode=True``) and skip connections read one activation and predict another,
so they are not dictionaries over one site; loading one raises ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.codes.saes.dictionary import (
    DenseDictionary,
    TopK,
    module_site,
    require,
    resolve_k,
)
from codebook_lens.model.codebook_model import HookSite


class SparsifyDictionary(DenseDictionary):
    """A sparsify ``SparseCoder`` (``Sae``) as a dictionary; ``hookpoint`` as sparsify names it.

    ``top_k`` is sparsify's own ``encode`` (its TopK / GroupMax selection), strongest first.
    """

    def __init__(self, sae: Any, hookpoint: str | None = None) -> None:
        super().__init__()
        cfg = sae.cfg
        for field in ("transcode", "skip_connection"):
            if getattr(cfg, field, False):
                raise ValueError(
                    f"{field}=True is not supported: this sparsify coder predicts a module's "
                    "output from its input, not one activation from itself; use an SAE "
                    f"({field}=False)"
                )
        if sae.W_dec is None:
            raise ValueError("this sparsify SAE was loaded with decoder=False; load its decoder")
        self.sae = sae
        self.hookpoint = hookpoint
        self.kind = f"sparsify_{cfg.activation}"
        self.num_latents = int(sae.num_latents)
        self.d_in = int(sae.d_in)
        self.k = int(cfg.k)

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    def encode(self, x: Tensor) -> Tensor:
        """``(..., d_in)`` -> ``(..., num_latents)``: the selected latents' activations."""
        top = self._encode(x)
        z = top.values.new_zeros(*top.values.shape[:-1], self.num_latents)
        # Unfired slots (id -1, value 0) add nothing to latent 0.
        return z.scatter_add_(-1, top.indices.clamp_min(0), top.values)

    def decode(self, z: Tensor) -> Tensor:
        """``z @ W_dec + b_dec`` for dense latent activations ``(..., num_latents)``."""
        return z.to(self.sae.dtype) @ self.sae.W_dec + self.sae.b_dec

    def top_k(self, x: Tensor, k: int | None = None) -> TopK:
        k = resolve_k(k, self.k, self.kind)
        if k != self.k:
            raise ValueError(
                f"k={k} is invalid for this sparsify SAE: it selects k={self.k} latents per "
                f"token; pass k=None or k={self.k}"
            )
        with torch.no_grad():
            return self._encode(x)

    def _encode(self, x: Tensor) -> TopK:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).to(self.sae.dtype)
        values, indices, _ = self.sae.encode(flat)  # (N, k), unsorted
        values, order = values.sort(dim=-1, descending=True)
        indices = indices.gather(-1, order).masked_fill(values == 0, -1)
        return TopK(values.reshape(*lead, -1), indices.reshape(*lead, -1))

    def site(self, model: nn.Module) -> HookSite:
        if self.hookpoint is None:
            raise ValueError(
                "hookpoint=None: this SAE was loaded without its hookpoint; load it with "
                "load_sparsify(folder) (the folder's name is the hookpoint) or pass hookpoint="
            )
        return sparsify_site(model, self.hookpoint)


def sparsify_site(model: nn.Module, hookpoint: str) -> HookSite:
    """The causal LM's module for a sparsify ``hookpoint`` (relative to ``model.base_model``)."""
    base = getattr(model, "base_model", model)
    prefix = next((name for name, mod in model.named_modules() if mod is base), "")
    path = f"{prefix}.{hookpoint}" if prefix else hookpoint
    return module_site(model, hookpoint, path)


def load_sparsify(path: str | Path, device: str | torch.device = "cpu") -> SparsifyDictionary:
    """One hookpoint's SAE from its folder (``cfg.json`` + ``sae.safetensors``).

    The folder's name is the hookpoint (sparsify names its folders so).
    """
    path = Path(path)
    if not (path / "cfg.json").is_file():
        inside = sorted(p.name for p in path.iterdir() if (p / "cfg.json").is_file())
        hint = f"; it holds the hookpoints {inside}: use load_sparsify_run" if inside else ""
        raise FileNotFoundError(f"{path} has no cfg.json (a sparsify hookpoint folder){hint}")
    sparsify = require("sparsify", "loading a sparsify SAE")
    sae = sparsify.SparseCoder.load_from_disk(path, device=device)
    return SparsifyDictionary(sae, hookpoint=path.name)


def load_sparsify_run(
    path: str | Path, device: str | torch.device = "cpu"
) -> dict[str, SparsifyDictionary]:
    """Every hookpoint's SAE of a sparsify run folder, by hookpoint, in sparsify's order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (a sparsify run)")
    sparsify = require("sparsify", "loading sparsify SAEs")
    names = [p.name for p in path.iterdir() if (p / "cfg.json").is_file()]
    if not names:
        raise FileNotFoundError(f"{path} holds no hookpoint folder (one with cfg.json)")
    saes = sparsify.SparseCoder.load_many(str(path), local=True, layers=names, device=device)
    return {name: SparsifyDictionary(sae, hookpoint=name) for name, sae in saes.items()}
