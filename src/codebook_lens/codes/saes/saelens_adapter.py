"""SAELens sparse autoencoders as dictionaries (``pip install codebook-lens[saes]``).

An SAELens SAE names its site with a TransformerLens hook name, ``cfg.metadata.hook_name``.
Those names map onto the Hugging Face modules of the same model (found by structure, as
codebook placements are, so GPT-2, GPT-NeoX, Llama and the other supported models all work):

============================  =========================================================
TransformerLens hook name     Hugging Face activation
============================  =========================================================
``blocks.{L}.hook_resid_pre``   input of block ``L`` (``transformer.h.{L}`` on GPT-2)
``blocks.{L}.hook_resid_post``  output of block ``L``
``blocks.{L}.hook_mlp_out``     output of block ``L``'s MLP (``transformer.h.{L}.mlp``)
``blocks.{L}.hook_attn_out``    output of block ``L``'s attention (``transformer.h.{L}.attn``)
``blocks.{L}.attn.hook_z``      input of the attention output projection (``attn.c_proj``):
                                the heads' outputs concatenated, ``n_heads * d_head`` wide
============================  =========================================================

SAELens trains on models loaded without TransformerLens's weight processing, whose activations
equal the Hugging Face model's. An SAE whose metadata asks for ``center_writing_weights`` saw
a residual stream centred over its width; its ``encode`` centres its input the same way.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.codes.saes.dictionary import DenseDictionary, require
from codebook_lens.model.codebook_model import HookSite, find_blocks, resolve_sites
from codebook_lens.model.config import CodebookConfig

# TransformerLens hook (after ``blocks.{L}.``) -> codebook placement at the same activation.
HOOK_PLACEMENTS = {
    "hook_resid_post": "residual",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "attn.hook_z": "attn_heads",
}
SUPPORTED_HOOKS = ("hook_resid_pre", *HOOK_PLACEMENTS)
_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
# Weight processing that changes what an SAE at these hooks saw (TransformerLens options).
_CENTRED_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
_Z_PROCESSING = ("fold_value_biases", "refactor_factored_attn_matrices")


def saelens_site(model: nn.Module, hook_name: str) -> HookSite:
    """The Hugging Face activation that TransformerLens's ``hook_name`` names (see module doc)."""
    m = _HOOK_NAME.fullmatch(hook_name)
    supported = ", ".join(f"'blocks.{{L}}.{h}'" for h in SUPPORTED_HOOKS)
    if m is None or m.group(2) not in SUPPORTED_HOOKS:
        raise ValueError(f"hook_name={hook_name!r} is not supported; supported: {supported}")
    layer, hook = int(m.group(1)), m.group(2)
    prefix, blocks = find_blocks(model)
    if layer >= len(blocks):
        raise ValueError(
            f"hook_name={hook_name!r} is invalid: the model has {len(blocks)} blocks "
            f"(layers 0 .. {len(blocks) - 1})"
        )
    if hook == "hook_resid_pre":
        return HookSite(hook_name, f"{prefix}.{layer}", "input", "residual", layer)
    config = CodebookConfig(placements=[HOOK_PLACEMENTS[hook]], layers=[layer])
    site = resolve_sites(model, config)[0]
    site.name = hook_name
    return site


def _kind(cfg: Any) -> str:
    arch = cfg.metadata.training_architecture or cfg.architecture()
    return "saelens_" + ("matryoshka" if arch.startswith("matryoshka") else arch)


class SAELensDictionary(DenseDictionary):
    """An SAELens ``SAE`` as a dictionary.

    ``k`` is the SAE's own for TopK SAEs; SAEs whose tokens fire a varying number of latents
    (JumpReLU, also BatchTopK and Matryoshka, which SAELens saves as JumpReLU) have
    ``k=None``, and ``top_k`` then needs ``k``. A ``hook_z`` SAE reads the heads' outputs
    concatenated (the Hugging Face layout), so its head reshaping is turned off.
    """

    def __init__(self, sae: Any) -> None:
        super().__init__()
        cfg = sae.cfg
        hook_name = cfg.metadata.hook_name
        if not hook_name:
            raise ValueError(
                "this SAELens SAE has no cfg.metadata.hook_name, so its site is unknown; set "
                "sae.cfg.metadata.hook_name (e.g. 'blocks.0.hook_resid_post')"
            )
        processing = cfg.metadata.model_from_pretrained_kwargs or {}
        hook = hook_name.split(".", 2)[-1]
        z_flags = [f for f in _Z_PROCESSING if processing.get(f)]
        if hook == "attn.hook_z" and z_flags:
            raise ValueError(
                f"model_from_pretrained_kwargs {z_flags} change attention's hook_z values; "
                "such an SAE does not read the Hugging Face model's activations"
            )
        if getattr(sae, "hook_z_reshaping_mode", False):
            sae.turn_off_forward_pass_hook_z_reshaping()
        self.sae = sae
        self.hook_name: str = hook_name
        self.centred = bool(processing.get("center_writing_weights")) and hook in _CENTRED_HOOKS
        self.kind = _kind(cfg)
        self.num_latents = int(cfg.d_sae)
        self.d_in = int(cfg.d_in)
        k = getattr(cfg, "k", None)
        self.k = int(k) if isinstance(k, int) else None

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    def encode(self, x: Tensor) -> Tensor:
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return self.sae.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.sae.decode(z)

    def site(self, model: nn.Module) -> HookSite:
        return saelens_site(model, self.hook_name)


def load_saelens(path: str, device: str | torch.device = "cpu") -> SAELensDictionary:
    """An SAE saved by SAELens (``cfg.json`` + ``sae_weights.safetensors``) from its folder."""
    sae_lens = require("sae_lens", "loading a SAELens SAE")
    return SAELensDictionary(sae_lens.SAE.load_from_disk(path, device=str(device)))


def saelens_from_pretrained(
    release: str, sae_id: str, device: str | torch.device = "cpu"
) -> SAELensDictionary:
    """A released SAE from SAELens's registry (downloads it from the hub: needs internet)."""
    sae_lens = require("sae_lens", "loading a SAELens SAE")
    return SAELensDictionary(sae_lens.SAE.from_pretrained(release, sae_id, device=str(device)))
