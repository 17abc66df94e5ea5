"""The k-means control: a base model's activations at a codebook's site, clustered the way a
k-means-initialised codebook that was never trained would code them."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codebook_lens.codes.analysis import window_inputs
from codebook_lens.codes.cache import CodeCache
from codebook_lens.model.codebook_model import eval_mode
from codebook_lens.model.layer import CodebookLayer


def module_activations(
    model: nn.Module,
    cache: CodeCache,
    module: str,
    hook: Literal["input", "output"],
    *,
    max_tokens: int,
    batch_size: int = 8,
) -> np.ndarray:
    """The input (or output) of ``model``'s ``module`` on the cache's first ``max_tokens``
    tokens, run in the same windows as the cache build -> ``(n, width)`` float32.

    For a model without codebooks (the base model of the k-means control); a codebook model's
    own sites go through ``analysis.site_activations``.
    """
    mods = dict(model.named_modules())
    if module not in mods:
        raise ValueError(f"module={module!r} is not a module of the base model")
    n = min(max_tokens, cache.n_tokens)
    tokens = np.asarray(cache.tokens)
    got: list[torch.Tensor] = []

    def grab_in(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())

    def grab_out(mod: nn.Module, args: Any, out: Any) -> None:
        got.append((out[0] if isinstance(out, tuple) else out).detach())

    handle = (
        mods[module].register_forward_pre_hook(grab_in)
        if hook == "input"
        else mods[module].register_forward_hook(grab_out)
    )
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    windows = list(cache.windows(n))
    try:
        with eval_mode(model), torch.no_grad():
            for b in range(0, len(windows), batch_size):
                batch = windows[b : b + batch_size]
                ids, mask = window_inputs(tokens, batch)
                got.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                x = got[0].float().cpu().numpy()
                if out is None:
                    out = np.zeros((n, x.shape[-1]), dtype=np.float32)
                for i, (s, e) in enumerate(batch):
                    out[s:e] = x[i, : e - s]
    finally:
        handle.remove()
    assert out is not None, "the cache has no tokens"
    return out


def kmeans_codes(
    acts: np.ndarray,
    *,
    num_codes: int,
    k: int,
    groups: int,
    similarity: str = "cosine",
    layer_norm: bool = False,
    fit_tokens: int = 100_000,
    iters: int = 20,
    seed: int = 0,
) -> np.ndarray:
    """The k-means control: ``num_codes`` centroids per group fitted (Lloyd, the layer's
    similarity) on ``fit_tokens`` random rows of ``acts`` ``(N, D)``, then each token's top-k
    centroids by that similarity -> ``(N, groups, k)`` ids, exactly as a ``CodebookLayer``
    initialised by k-means and never trained would choose them."""
    n, d = acts.shape
    layer = CodebookLayer(
        d, num_codes, k, groups=groups, similarity=similarity, grouped=True, kmeans_iters=iters
    )
    x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).reshape(n, groups, -1)
    if layer_norm:  # the layer normalises each slice before scoring
        x = F.layer_norm(x, (x.shape[-1],))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(fit_tokens, n), replace=False))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer.init_kmeans(x[torch.from_numpy(rows)])
    layer.eval()
    return layer.search(x).numpy().astype(np.uint16 if num_codes <= 65_536 else np.uint32)


def kmeans_like(layer: CodebookLayer, acts: np.ndarray, **fit: Any) -> np.ndarray:
    """``kmeans_codes`` with the size, heads, similarity and normalisation of ``layer``
    (``fit``: ``fit_tokens``, ``iters``, ``seed``)."""
    shape = {a: getattr(layer, a) for a in ("num_codes", "k", "groups", "similarity", "layer_norm")}
    return kmeans_codes(acts, **shape, **fit)
