"""Direct logit effect of a code: which output tokens its vector pushes up most.

Sits below ``search`` and ``analysis`` (both use it): it needs a cache (identity, vocabulary)
and the model, and nothing from either of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from codebook_lens.codes.cache import CodeCache, check_identity

if TYPE_CHECKING:
    from torch import Tensor, nn

    from codebook_lens.codes.saes.model import DictionaryModel
    from codebook_lens.model.codebook_model import CodebookModel

PROMOTED_NOTE = (
    "direct logit effect: the code vector (for a head, after the attention output projection) "
    "passed through the final norm as if it were the whole residual stream (centred for "
    "LayerNorm, scaled to unit RMS, times the norm's gain, bias dropped), then unembedded; "
    "later layers are ignored"
)


@dataclass
class PromotedToken:
    token_id: int
    text: str
    logit: float
    """Direct logit effect (see ``PROMOTED_NOTE`` for the approximation)."""


def _final_norm(base: nn.Module) -> nn.Module | None:
    from codebook_lens.model.codebook_model import find_blocks

    prefix, _ = find_blocks(base)
    found = None
    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(prefix + ".") or not name:
            continue
        if leaf in ("ln_f", "final_layer_norm", "norm", "final_norm", "norm_f"):
            found = mod
    return found


def promoted_tokens(
    model: CodebookModel | DictionaryModel,
    cache: CodeCache,
    codebook: str,
    code: int,
    head: int | None = None,
    *,
    top: int = 20,
) -> tuple[list[PromotedToken] | None, str]:
    """Tokens whose logits the code's vector raises most (see ``PROMOTED_NOTE``).

    Returns ``(None, reason)`` where it cannot be computed (module-glob codebooks, no
    unembedding); ``ValueError`` if the cache was built with another model.
    """
    import torch

    check_identity(cache, model)
    h = cache.check_code(codebook, code, head)
    cb = cache.info(codebook)
    base = model.base
    get_out = getattr(base, "get_output_embeddings", None)
    unembed = get_out() if callable(get_out) else None
    if not isinstance(unembed, torch.nn.Module) or not hasattr(unembed, "weight"):
        return None, "no output embedding found on the model"
    if cb.is_sae:  # an SAE latent writes its decoder row (a width check follows)
        sae = getattr(model, "dictionaries", {}).get(codebook)
        if sae is None:
            return None, f"the model was loaded without the SAE {codebook!r}"
        vec = sae.W_dec[code].detach().float()
        return _unembedded(cache, base, unembed, vec, top)
    layer = model.codebooks[codebook]
    site = next(s for s in model.sites if s.name == codebook)
    with torch.no_grad():
        vec = layer.codebook[h, code].detach().float()
        if cb.placement == "attn_heads":
            proj: nn.Module = dict(base.named_modules())[site.module]
            x = torch.zeros(layer.dim, dtype=vec.dtype, device=vec.device)
            x[h * layer.head_dim : (h + 1) * layer.head_dim] = vec
            p_dtype = next(proj.parameters()).dtype
            # .forward skips the module's hooks: the codebook's own pre-hook (and any active
            # intervention) must not quantize the vector we are projecting.
            fwd = proj.forward
            vec = (fwd(x[None].to(p_dtype)) - fwd(torch.zeros_like(x)[None].to(p_dtype)))[0]
            vec = vec.float()
        elif cb.placement not in ("mlp_out", "attn_out", "residual"):
            return None, f"not computed for placement {cb.placement!r} (not the residual width)"
    return _unembedded(cache, base, unembed, vec, top)


def _unembedded(
    cache: CodeCache, base: nn.Module, unembed: nn.Module, vec: Tensor, top: int
) -> tuple[list[PromotedToken] | None, str]:
    """The ``top`` tokens whose logits the residual-width ``vec`` raises most."""
    import torch

    with torch.no_grad():
        norm = _final_norm(base)
        if norm is not None and (hasattr(norm, "bias") or isinstance(norm, torch.nn.LayerNorm)):
            vec = vec - vec.mean()
        vec = vec / vec.pow(2).mean().sqrt().clamp_min(1e-12)
        gain = getattr(norm, "weight", None) if norm is not None else None
        if isinstance(gain, torch.Tensor) and gain.shape == vec.shape:
            vec = vec * gain.float()
        weight = unembed.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.float()
        if w.shape[1] != vec.shape[0]:
            return (
                None,
                f"code width {vec.shape[0]} does not match the unembedding {tuple(w.shape)}",
            )
        logits = (w @ vec).cpu().numpy()
    order = np.argsort(-logits, kind="stable")[:top]
    return [
        PromotedToken(int(t), cache.token_str(int(t)), float(logits[t])) for t in order
    ], PROMOTED_NOTE
