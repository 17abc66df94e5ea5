"""The codebook bottleneck: replace an activation by the sum of its k best-matching codes.

Shapes: an input ``(..., dim)`` is split into ``groups`` slices of ``head_dim = dim // groups``
(one codebook per attention head; ``groups=1`` is a single codebook). The codebook tensor is
``(groups, num_codes, head_dim)``. Codes come back as ``(..., groups, k)`` for grouped layers and
``(..., k)`` otherwise.

Forward: score every code (chunked over tokens so the ``tokens x codes`` score matrix never
exists whole, and never kept for backward), keep the top k, output their sum (or mean).
Backward: the input receives the output's gradient unchanged (straight-through); the chosen
codes receive the downstream gradient plus ``recon_weight * mse(output, sg(input))``.

This module has no Hugging Face imports; ``attach.py`` puts layers into models.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import REDUCTIONS, SIMILARITIES, check_choice, check_range


class CodebookOutput(NamedTuple):
    """Result of ``CodebookLayer.forward``."""

    output: Tensor
    """Quantized activation, same shape and dtype as the input."""
    codes: Tensor
    """Chosen code ids (int64): ``(..., groups, k)`` if grouped else ``(..., k)``; best first."""
    loss: Tensor
    """Scalar: ``recon_weight * reconstruction + commitment_weight * commitment``."""


class CodeEdit(Protocol):
    """A change to code choice, applied inside ``CodebookLayer.forward`` (see ``intervene.py``).

    ``lead_shape`` is the input's shape without its last dim, e.g. ``(batch, seq)``; token row
    ``r`` of the flattened input is position ``unravel(r, lead_shape)``.
    """

    def edit_scores(self, scores: Tensor, rows: slice, lead_shape: tuple[int, ...]) -> Tensor:
        """Return edited scores ``(groups, n, num_codes)`` for token rows ``rows``."""
        ...

    def edit_codes(
        self, codes: Tensor, lead_shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor | None]:
        """Return codes ``(tokens, groups, k')`` and optional weights of the same shape."""
        ...


class LayerStats(NamedTuple):
    """Codebook health since the last ``reset_stats()`` (read on demand; one host sync)."""

    counts: Tensor
    """``(groups, num_codes)`` times each code was chosen."""
    tokens: int
    """Tokens seen (each token chooses k codes per group)."""
    dead_fraction: float
    """Fraction of codes never chosen (or, with dead-code revival on, unused for its window)."""
    entropy: float
    """Mean over groups of the usage entropy in nats."""
    perplexity: float
    """exp(entropy): the effective number of codes in use per group."""
    mse: float
    """Mean squared reconstruction error per element."""
    revived: int
    """Codes re-initialised by dead-code revival since creation."""


class CodebookLayer(nn.Module):
    """Vector-quantization bottleneck with top-k codes, straight-through gradients and revival.

    Args:
        dim: width of the activation (all groups together).
        num_codes: codes per codebook (C).
        k: codes chosen per token and group.
        groups: independent codebooks on equal slices of ``dim`` (one per attention head).
        similarity: 'cosine' (default), 'inner_product' or 'euclidean'.
        reduction: output is the 'sum' or the 'mean' of the chosen codes.
        recon_weight: weight of ``mse(output, sg(input))`` (gradient to codes only).
        commitment_weight: weight of ``mse(input, sg(output))`` (gradient to input only).
        layer_norm: LayerNorm (no affine) each group's slice before scoring; output stays normed.
        kmeans_init: run k-means on the first training batch to initialise the codes.
        kmeans_iters: Lloyd iterations for k-means.
        dead_code_steps: revive codes unused for this many ``step()`` calls (0 = off).
        revival_noise: relative noise added to revived codes.
        chunk_size: (token, group) rows scored at once; bounds extra memory.
        recent_size: recent inputs kept per group for revival.
        grouped: return codes with a group axis even if ``groups == 1``.
    """

    counts: Tensor
    usage: Tensor
    steps_unused: Tensor
    tokens_seen: Tensor
    mse_sum: Tensor
    revived: Tensor
    initialized: Tensor
    recent: Tensor
    recent_filled: Tensor

    def __init__(
        self,
        dim: int,
        num_codes: int,
        k: int = 1,
        *,
        groups: int = 1,
        similarity: str = "cosine",
        reduction: str = "sum",
        recon_weight: float = 1.0,
        commitment_weight: float = 0.0,
        layer_norm: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        revival_noise: float = 0.01,
        chunk_size: int = 2048,
        recent_size: int = 2048,
        grouped: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_codes", num_codes), ("k", k), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        if k > num_codes:
            raise ValueError(f"k={k} is invalid; it must be <= num_codes={num_codes}")
        if dim % groups:
            raise ValueError(
                f"dim={dim} is invalid for groups={groups}: the width must divide evenly into "
                f"the groups (heads); {dim} % {groups} = {dim % groups}"
            )
        check_choice("similarity", similarity, SIMILARITIES)
        check_choice("reduction", reduction, REDUCTIONS)
        check_range("recon_weight", recon_weight, 0.0)
        check_range("commitment_weight", commitment_weight, 0.0)
        check_range("revival_noise", revival_noise, 0.0)
        for name, value in (
            ("chunk_size", chunk_size),
            ("recent_size", recent_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        if dead_code_steps < 0 or kmeans_iters < 0:
            raise ValueError("dead_code_steps and kmeans_iters must be >= 0")

        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.head_dim = dim // groups
        self.similarity, self.reduction = similarity, reduction
        self.recon_weight, self.commitment_weight = recon_weight, commitment_weight
        self.layer_norm, self.kmeans_init, self.kmeans_iters = layer_norm, kmeans_init, kmeans_iters
        self.dead_code_steps, self.revival_noise = dead_code_steps, revival_noise
        self.chunk_size, self.recent_size = chunk_size, recent_size
        self.grouped = groups > 1 if grouped is None else grouped

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init = torch.randn(groups, num_codes, self.head_dim, generator=gen)
        # Unit-variance inputs have norm ~sqrt(head_dim); start codes at that scale.
        self.codebook = nn.Parameter(init)

        g, c, d = groups, num_codes, self.head_dim
        self.register_buffer("counts", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("usage", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("steps_unused", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mse_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("revived", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("recent", torch.zeros(g, recent_size if dead_code_steps else 0, d))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.int64))
        # Host-side mirrors of small buffers so the hot path never syncs to read them.
        self._initialized = not kmeans_init
        self._recent_filled = 0
        self._recent_ptr = 0
        self.register_load_state_dict_post_hook(_refresh_mirrors)

        self.edit: CodeEdit | None = None
        """An active intervention (set by ``intervene``); ``None`` means plain top-k."""
        self.last_loss: Tensor | None = None
        """Loss of the latest forward pass (read by ``CodebookModel.codebook_loss``)."""

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, groups={self.groups}, "
            f"similarity={self.similarity!r}, reduction={self.reduction!r}"
        )

    # ----------------------------------------------------------------- search
    def _score_params(self) -> tuple[Tensor, Tensor | None]:
        """Weights ``(groups, C, d)`` and bias ``(groups, C)`` so that ranking by
        ``x @ w.T + b`` equals ranking by the chosen similarity."""
        cb = self.codebook.detach()
        if self.similarity == "cosine":
            # |x| is constant per token, so x.c/|c| ranks the same as cosine.
            return cb / cb.norm(dim=-1, keepdim=True).clamp_min(1e-12), None
        if self.similarity == "inner_product":
            return cb, None
        # -|x - c|^2 = 2 x.c - |c|^2 - |x|^2; drop the per-token constant and halve.
        return cb, -0.5 * cb.pow(2).sum(-1)

    @torch.no_grad()
    def search(
        self, x: Tensor, k: int | None = None, lead_shape: tuple[int, ...] | None = None
    ) -> Tensor:
        """Top-k code ids for ``x`` of shape ``(tokens, groups, head_dim)`` -> ``(tokens, groups, k)``.

        Scores ``chunk_size`` rows at a time; peak extra memory is ``chunk_size * num_codes``
        floats whatever the number of tokens.
        """
        k = self.k if k is None else k
        n_tok = x.shape[0]
        lead_shape = (n_tok,) if lead_shape is None else lead_shape
        w, b = self._score_params()
        wt = w.transpose(1, 2)  # (G, d, C)
        out = torch.empty(n_tok, self.groups, k, dtype=torch.int64, device=x.device)
        step = max(1, self.chunk_size // self.groups)
        xt = x.transpose(0, 1)  # (G, tokens, d), a view
        for start in range(0, n_tok, step):
            rows = slice(start, min(start + step, n_tok))
            xs = xt[:, rows].float() if x.dtype != w.dtype else xt[:, rows]
            # (G, n, C) scores for this chunk only
            scores = torch.bmm(xs, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xs, wt)
            if self.edit is not None:
                scores = self.edit.edit_scores(scores, rows, lead_shape)
            out[rows] = scores.topk(k, dim=-1).indices.transpose(0, 1)
        return out

    # ---------------------------------------------------------------- decode
    def decode(self, codes: Tensor, weights: Tensor | None = None) -> Tensor:
        """Code ids ``(..., groups, k)`` (or ``(..., k)`` ungrouped) -> output ``(..., dim)``.

        Differentiable with respect to the codebook. ``weights`` scales each chosen code.
        """
        if not self.grouped:
            codes = codes.unsqueeze(-2)
            weights = None if weights is None else weights.unsqueeze(-2)
        if codes.shape[-2] != self.groups:
            raise ValueError(
                f"codes have {codes.shape[-2]} groups; this codebook has groups={self.groups}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"code ids must be in [0, {self.num_codes - 1}] (num_codes)")
        lead, kk = codes.shape[:-2], codes.shape[-1]
        flat_w = None if weights is None else weights.reshape(-1, self.groups, kk)
        q = self._decode_flat(codes.reshape(-1, self.groups, kk), flat_w)
        return q.reshape(*lead, self.dim)

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> CodebookOutput:
        """Quantize ``x`` of shape ``(..., dim)``; see ``CodebookOutput``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} does not match dim={self.dim}")
        lead = tuple(x.shape[:-1])
        in_dtype = x.dtype
        xg = x.reshape(-1, self.groups, self.head_dim).to(self.codebook.dtype)  # (N, G, d)
        if self.layer_norm:
            xg = F.layer_norm(xg, (self.head_dim,))
        xd = xg.detach()
        if self.training and not self._initialized:
            self.init_kmeans(xd)

        codes = self.search(xd, lead_shape=lead)  # (N, G, k)
        weights = None
        if self.edit is not None:
            codes, weights = self.edit.edit_codes(codes, lead)
        q = self._decode_flat(codes, weights)  # (N, G, d)

        loss = q.new_zeros(())
        if self.recon_weight:
            loss = loss + self.recon_weight * F.mse_loss(q, xd)
        if self.commitment_weight:
            loss = loss + self.commitment_weight * F.mse_loss(xg, q.detach())
        self.last_loss = loss
        self._update_stats(xd, q.detach(), codes)

        # Value is exactly q; gradient flows to both q (codes) and x (straight-through).
        out = q + (xg - xd)
        out = out.reshape(*lead, self.dim).to(in_dtype)
        codes_out = codes.reshape(*lead, self.groups, codes.shape[-1])
        if not self.grouped:
            codes_out = codes_out.squeeze(-2)
        return CodebookOutput(out, codes_out, loss)

    def _decode_flat(self, codes: Tensor, weights: Tensor | None) -> Tensor:
        """``(N, G, k')`` ids -> ``(N, G, d)`` vectors, differentiable w.r.t. the codebook."""
        offsets = torch.arange(self.groups, device=codes.device).view(1, -1, 1) * self.num_codes
        table = self.codebook.reshape(self.groups * self.num_codes, self.head_dim)
        vectors = F.embedding(codes + offsets, table)  # (N, G, k', d)
        if weights is not None:
            vectors = vectors * weights.unsqueeze(-1).to(vectors.dtype)
        q = vectors.sum(-2)
        return q if self.reduction == "sum" else q / self.k

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def _update_stats(self, x: Tensor, q: Tensor, codes: Tensor) -> None:
        codes = codes.clamp(0, self.num_codes - 1)
        offsets = torch.arange(self.groups, device=codes.device).view(1, -1, 1) * self.num_codes
        flat = (codes + offsets).reshape(-1)
        ones = torch.ones_like(flat)
        self.counts.view(-1).index_add_(0, flat, ones)
        self.tokens_seen += x.shape[0]
        self.mse_sum += (q - x).pow(2).mean(-1).sum(-1).sum().double() / self.groups
        if self.training:
            self.usage.view(-1).index_add_(0, flat, ones)
            if self.dead_code_steps:
                self._remember(x)

    @torch.no_grad()
    def _remember(self, x: Tensor) -> None:
        """Keep a ring buffer of recent inputs (per group) to revive dead codes from."""
        size = self.recent_size
        n = x.shape[0]
        if n >= size:
            pick = torch.randint(0, n, (size,), device=x.device)
            self.recent.copy_(x[pick].transpose(0, 1))
            self._recent_ptr, self._recent_filled = 0, size
        else:
            idx = (torch.arange(n, device=x.device) + self._recent_ptr) % size
            self.recent[:, idx] = x.transpose(0, 1)
            self._recent_ptr = (self._recent_ptr + n) % size
            self._recent_filled = min(size, self._recent_filled + n)
        self.recent_filled.fill_(self._recent_filled)

    @torch.no_grad()
    def step(self) -> None:
        """Advance the dead-code clock by one optimizer step and revive codes past it.

        Call once after each optimizer step (the trainer does). Codes unused for
        ``dead_code_steps`` steps are replaced by random recent inputs plus small noise;
        used codes are left untouched. No host synchronisation.
        """
        used = self.usage > 0
        self.steps_unused.copy_(torch.where(used, 0, self.steps_unused + 1))
        self.usage.zero_()
        if not self.dead_code_steps or self._recent_filled == 0:
            return
        dead = self.steps_unused >= self.dead_code_steps  # (G, C)
        g, c, d = self.codebook.shape
        pick = torch.randint(0, self._recent_filled, (g, c), device=self.codebook.device)
        fresh = self.recent[:, : self._recent_filled].gather(1, pick.unsqueeze(-1).expand(g, c, d))
        scale = fresh.norm(dim=-1, keepdim=True) / math.sqrt(d)
        fresh = fresh + torch.randn_like(fresh) * self.revival_noise * scale
        self.codebook.copy_(torch.where(dead.unsqueeze(-1), fresh, self.codebook))
        self.revived += dead.sum()
        self.steps_unused.masked_fill_(dead, 0)
        self.counts.masked_fill_(dead, 0)

    @torch.no_grad()
    def reset_stats(self) -> None:
        """Zero the usage counts and reconstruction error (the dead-code clock is kept)."""
        self.counts.zero_()
        self.tokens_seen.zero_()
        self.mse_sum.zero_()

    @torch.no_grad()
    def stats(self) -> LayerStats:
        """Read the statistics gathered since ``reset_stats()``."""
        counts = self.counts.detach().cpu()
        tokens = int(self.tokens_seen)
        if self.dead_code_steps:
            dead = (self.steps_unused.cpu() >= self.dead_code_steps) | (counts == 0)
        else:
            dead = counts == 0
        p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
        return LayerStats(
            counts=counts,
            tokens=tokens,
            dead_fraction=float(dead.double().mean()),
            entropy=ent,
            perplexity=math.exp(ent),
            mse=float(self.mse_sum) / max(tokens, 1),
            revived=int(self.revived),
        )

    # ---------------------------------------------------------------- k-means
    @torch.no_grad()
    def init_kmeans(self, x: Tensor, iters: int | None = None) -> None:
        """Initialise the codes by k-means (Lloyd) on ``x`` of shape ``(tokens, groups, d)``
        or ``(tokens, dim)``, using this layer's similarity for assignment."""
        iters = self.kmeans_iters if iters is None else iters
        if x.dim() == 2:
            x = x.reshape(-1, self.groups, self.head_dim)
        x = x.to(self.codebook.dtype)
        n = x.shape[0]
        g, c, d = self.codebook.shape
        if n >= c:
            start = torch.randperm(n, device=x.device)[:c]
            cent = x[start].transpose(0, 1).clone()  # (G, C, d)
        else:
            start = torch.randint(0, n, (c,), device=x.device)
            cent = x[start].transpose(0, 1).clone()
            cent += torch.randn_like(cent) * 0.01 * cent.norm(dim=-1, keepdim=True) / math.sqrt(d)
        xt = x.transpose(0, 1)  # (G, N, d)
        old_k, old_edit = self.k, self.edit
        self.edit = None
        try:
            for _ in range(iters):
                self.codebook.copy_(cent)
                assign = self.search(x, k=1)[..., 0].transpose(0, 1)  # (G, N)
                sums = torch.zeros_like(cent).scatter_add_(
                    1, assign.unsqueeze(-1).expand(g, n, d), xt
                )
                cnt = torch.zeros(g, c, device=x.device, dtype=x.dtype).scatter_add_(
                    1, assign, torch.ones_like(assign, dtype=x.dtype)
                )
                cent = torch.where(
                    cnt.unsqueeze(-1) > 0, sums / cnt.clamp_min(1).unsqueeze(-1), cent
                )
        finally:
            self.k, self.edit = old_k, old_edit
        self.codebook.copy_(cent)
        self._initialized = True
        self.initialized.fill_(True)


def _refresh_mirrors(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, CodebookLayer)
    module._initialized = bool(module.initialized)
    module._recent_filled = int(module.recent_filled)
    module._recent_ptr = module._recent_filled % max(module.recent_size, 1)
