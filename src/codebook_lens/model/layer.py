"""The codebook bottleneck: replace an activation by the sum of its k best-matching codes.

Shapes: an input ``(..., dim)`` is split into ``groups`` slices of ``head_dim = dim // groups``
(one codebook per attention head; ``groups=1`` is a single codebook). The codebook tensor is
``(groups, num_codes, head_dim)``. Codes come back as ``(..., groups, k)`` for grouped layers and
``(..., k)`` otherwise.

Forward: score every code (in cache-sized tiles of tokens, top-k taken per tile, so the
``tokens x codes`` score matrix never exists whole and is never kept for backward), keep the
top k, output their sum (or mean). On CPU the tiles of all groups are shared out to
``torch.get_num_threads()`` threads that each run single-threaded BLAS on their own tile.
Backward: the input receives the output's gradient unchanged (straight-through); the chosen
codes receive the downstream gradient plus ``recon_weight * mse(output, sg(input))``.

This module has no Hugging Face imports; ``codebook_model.py`` puts layers into models.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebook_lens.config import check_choice, check_range
from codebook_lens.model import distributed
from codebook_lens.model.config import NONFINITE_POLICIES, REDUCTIONS, SCORE_DTYPES, SIMILARITIES
from codebook_lens.model.cpu_threads import one_cpu_thread, run_parallel
from codebook_lens.model.faiss_index import FaissIndex


class CodebookOutput(NamedTuple):
    """Result of ``CodebookLayer.forward``."""

    output: Tensor
    """Quantized activation, same shape and dtype as the input."""
    codes: Tensor
    """Chosen code ids (int64): ``(..., groups, k)`` if grouped else ``(..., k)``; best first.
    ``-1`` marks (token, group) slices skipped for non-finite input (``nonfinite='skip'``)."""
    loss: Tensor
    """Scalar: ``recon_weight * reconstruction + commitment_weight * commitment``."""


class CodeEdit(Protocol):
    """A change to code choice, applied inside ``CodebookLayer.forward`` (see ``codes.intervene``).

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
    skipped: int = 0
    """(token, group) slices passed through unquantized because they held NaN/inf
    (``nonfinite='skip'``); not saved with the weights."""


class NonFiniteInputError(ValueError):
    """A codebook layer received NaN/inf activations (with ``nonfinite='raise'``)."""


def _block_size(num_codes: int, k: int) -> int:
    """Rows ``B`` of the two-stage top-k (0: use ``torch.topk`` directly).

    Measured on CPU (benchmarks/README.md): the two-stage path wins from a few hundred codes
    at k=1 and from a few thousand at k=8, and ``B ~ sqrt(C) / 10`` (at least 8) is near the
    best block count at C = 1k..50k. A divisor of ``C`` near it avoids a ragged tail.
    """
    if num_codes < (256 if k == 1 else 2048) or num_codes < 64 * k:
        return 0
    target = max(8, min(64, round(math.sqrt(num_codes) / 10)))
    for delta in range(target // 3 + 1):
        for b in (target - delta, target + delta):
            if num_codes % b == 0:
                return b
    return target


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``(..., k)`` of the ``k`` largest ``scores`` along the last dim, best first.

    Exact, and 2-4x faster than ``torch.topk`` on CPU for ``k << C``: the ``C`` columns are
    dealt into ``nb = C // B`` strided blocks (column ``j`` -> block ``j % nb``), one
    vectorised ``amax`` over ``B`` rows gives every block's maximum, and the top k lie inside
    the k blocks with the largest maxima (an element beaten by k block maxima is not in the
    top k). The final selection then runs on ``k * B`` candidates (plus the ``C % B`` tail
    columns) instead of ``C``. Ties may be broken differently from ``torch.topk``.
    """
    c = scores.shape[-1]
    b = _block_size(c, k)
    if b == 0:
        return scores.topk(k, dim=-1).indices
    lead = scores.shape[:-1]
    s = scores.reshape(-1, c)
    n, nb = s.shape[0], c // b
    main = s if nb * b == c else s[:, : nb * b]  # a full slice would make amax slower
    block_max = main.reshape(n, b, nb).amax(1)  # (n, nb)
    if k == 1:  # max(dim).indices (the first maximum, as argmax) is cheaper than topk(1),
        # and about twice as fast as argmax on CPU
        top_blocks = block_max.max(-1, keepdim=True).indices
    else:
        top_blocks = block_max.topk(k, dim=-1, sorted=False).indices  # (n, k)
    offsets = torch.arange(0, nb * b, nb, device=s.device)  # (B,)
    cand = (top_blocks.unsqueeze(-1) + offsets).view(n, k * b)
    if nb * b < c:
        tail = torch.arange(nb * b, c, device=s.device).expand(n, -1)
        cand = torch.cat([cand, tail], dim=1)
    vals = s.gather(1, cand)
    best = vals.max(-1, keepdim=True).indices if k == 1 else vals.topk(k, dim=-1).indices
    return cand.gather(1, best).view(*lead, k)


_TILE_BYTES = 4 << 20
"""Size of one fp32 score tile ``(rows, num_codes)`` on CPU. Each thread writes its tile and
takes its top-k while the tile is still in cache, instead of streaming a ``chunk_size x C``
matrix (80 MB at 2,048 x 10,000) through memory and back (benchmarks/README.md, tile sweep)."""
_MIN_TILE_ROWS = 32
"""Fewest token rows per tile: smaller matrix products leave the BLAS kernel underfed."""
_SMALL_SEARCH = 1 << 18
"""Searches with at most this many scores (tokens x groups x codes) over a codebook of at most
this many elements run as one batched product in the calling thread: for one generated token,
handing tiles to threads costs more than it saves."""
SMALL_CALL_ELEMENTS = 1 << 21
"""CPU calls whose input has at most this many elements (tokens x dim) run their element-wise
work (layer norm, losses, straight-through, statistics) on one intra-op thread; the search
still shares its tiles over every thread. Such ops take tens of microseconds, and splitting
them over threads makes each wait for its partner thread, milliseconds on a busy machine
(benchmarks/README.md, per-call breakdown)."""
AUTO_CHECK_SCORES = 1 << 24
"""``score_dtype='auto'`` decides on the first search with at least this many scores (tokens x
groups x codes): smaller ones are too short to time and run in fp32."""
AUTO_BF16_GAIN = 0.8
"""``score_dtype='auto'`` picks bf16 only if its search takes less than this share of fp32's."""
BF16_MARGIN = 8
"""Extra candidates kept by the bf16 search (``score_dtype='bfloat16'``) beyond k, re-ranked
exactly in fp32: bf16 rounding (8-bit mantissa) reorders near-ties, rarely by more than a few
places (agreement with fp32 codes in benchmarks/README.md)."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_matrix_units(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices in hardware, and what was found."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"device {device.type}: bf16 units unknown"
    found = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    capability = torch.backends.cpu.get_cpu_capability()
    if found:
        return True, f"CPU has {', '.join(found)} (torch CPU capability {capability})"
    return False, (
        f"CPU has neither amx_bf16 nor avx512_bf16 (torch CPU capability {capability}): bf16 "
        "matrix products are emulated and slower than fp32"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tile_rows(num_codes: int, limit: int) -> int:
    """Token rows per CPU score tile: about ``_TILE_BYTES`` of fp32 scores, at most ``limit``."""
    return max(1, min(limit, max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * num_codes))))


_TILES = threading.local()
"""Each thread's reusable score tiles by dtype (see ``_tile``)."""


def _top1_padded_layout(num_codes: int, k: int) -> tuple[int, int, int]:
    """``(B, nb, nb_pad)`` when the CPU k=1 search scores into blocks padded to a multiple of
    16 columns (see ``_top1_padded``), else ``(0, 0, 0)``."""
    b = _block_size(num_codes, k)
    if k != 1 or b == 0 or num_codes % b:
        return 0, 0, 0
    nb = num_codes // b
    nbp = -(-nb // 16) * 16
    # Pads cost matrix-product columns: only where they add at most an eighth.
    return (b, nb, nbp) if 0 < nbp - nb <= nb // 8 else (0, 0, 0)


def _top1_padded(scores: Tensor, b: int, nb: int) -> Tensor:
    """``topk_indices(s, 1)`` from ``scores`` ``(n, B * nb_pad)``: ``s`` with each of its ``B``
    rows of ``nb`` blocks padded to ``nb_pad`` columns (pads filled with ``-inf`` here).

    The same blocks in the same order, so the same ids (ties included), but the block-maximum
    pass runs on rows of a multiple of 16 floats: 0.17 against 0.29 ms for 1,048 x 1,000.
    """
    n = scores.shape[0]
    v = scores.view(n, b, -1)
    v[:, :, nb:].fill_(float("-inf"))
    top_block = v.amax(1).max(-1, keepdim=True).indices  # (n, 1)
    offsets = torch.arange(0, v.shape[1] * v.shape[2], v.shape[2], device=scores.device)
    row = scores.gather(1, top_block + offsets).max(-1, keepdim=True).indices
    return row * nb + top_block


def _tile(numel: int, dtype: torch.dtype) -> Tensor:
    """A flat scratch tile of at least ``numel`` elements for the calling thread.

    Tiles up to twice ``_TILE_BYTES`` are kept per thread and reused by every search: a fresh 4 MB
    tensor costs a page fault per page on first write, which at 2,080 tokens x 4 groups x
    1,000 codes doubled the matrix products' time. Larger tiles are made afresh.
    """
    if numel * dtype.itemsize > 2 * _TILE_BYTES:
        return torch.empty(numel, dtype=dtype)
    cache: dict[torch.dtype, Tensor] | None = getattr(_TILES, "by_dtype", None)
    if cache is None:
        cache = _TILES.by_dtype = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = cache[dtype] = torch.empty(max(numel, _TILE_BYTES // dtype.itemsize), dtype=dtype)
    return buf


def _unit_codes(cb: Tensor, out: Tensor | None = None) -> Tensor:
    """``cb / |cb|`` over the last dim (fp32), optionally into ``out``; the one formula every
    search path uses, so that all of them rank codes on identical numbers."""
    norm = cb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return cb / norm if out is None else torch.div(cb, norm, out=out)


def _neg_half_sq_norm(cb: Tensor) -> Tensor:
    """``-|c|^2 / 2`` per code: with it, ``x.c - |c|^2/2`` ranks like ``-|x - c|^2``."""
    return cb.pow(2).sum(-1).mul_(-0.5)


def _has_low_precision_cpu_mse() -> bool:
    try:
        F.mse_loss(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16))
    except RuntimeError:  # torch 2.4 has no bf16/fp16 mse kernel on the CPU
        return False
    return True


_LOW_PRECISION_CPU_MSE = _has_low_precision_cpu_mse()


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """``F.mse_loss``, spelled out where this torch lacks a CPU kernel for the dtype."""
    if (
        not _LOW_PRECISION_CPU_MSE
        and a.device.type == "cpu"
        and a.dtype in (torch.bfloat16, torch.float16)
    ):
        return (a - b).pow(2).mean()
    return F.mse_loss(a, b)


def _storage_users(t: Tensor) -> int:
    """References to ``t``'s storage, as torch counts them (the count's base varies by version)."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


def _sole_user_count() -> int:
    """What ``_storage_users`` reads for a tensor held once (2 on torch 2.13, 1 on 2.4: whether
    the temporary storage handle counts changed between versions), or -1 when the count does
    not see a second reference, in which case the gradient buffer is never reused."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return -1
    t = torch.zeros(1)
    alone = _storage_users(t)
    view = t.view_as(t)
    shared = _storage_users(t)
    del view
    return alone if shared > alone else -1


_SOLE_USER = _sole_user_count()


class _GradBuffer:
    """A zero-filled codebook gradient that is reused from one backward to the next.

    A fresh ``torch.zeros`` of a large codebook (40 MB for 16 heads x 10k x 64) costs page
    faults and a full memset on every backward, while the backward writes only the rows of
    the chosen codes. This keeps the tensor and, when nobody else holds its storage any more
    (``.grad`` was set to None) and nothing wrote to it since (its version counter), zeroes
    just the rows written last time; after an outside in-place write (e.g. gradient clipping
    scaled ``.grad``) it zeroes the whole tensor in place; while it is still referenced it is
    left alone and a fresh tensor is made.
    """

    MIN_ELEMENTS = 1 << 18
    """Smaller tables are cheaper to allocate afresh (the allocator reuses their memory)."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.rows: Tensor | None = None
        self.version = -1

    def zeros(self, like: Tensor) -> Tensor:
        """A zero tensor shaped like ``like`` (the flattened ``(G * C, d)`` table)."""
        buf = self.buf
        if like.numel() < self.MIN_ELEMENTS or _SOLE_USER < 0:
            return torch.zeros_like(like)
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != like.dtype
            or buf.device != like.device
            or _storage_users(buf) > _SOLE_USER
        ):
            buf = self.buf = torch.zeros_like(like)
        elif buf._version != self.version or self.rows is None:
            buf.zero_()
        else:
            buf.index_fill_(0, self.rows, 0.0)
        self.rows = None
        return buf

    def written(self, buf: Tensor, rows: Tensor) -> None:
        """Record that ``rows`` of ``buf`` (from ``zeros``) now hold gradient."""
        if buf is self.buf:
            self.rows, self.version = rows, buf._version


def rerank(scores: Tensor, xs: Tensor, w: Tensor, b: Tensor | None, k: int) -> Tensor:
    """Top-k ids from low-precision ``scores`` ``(..., n, C)``, re-ranked exactly in fp32.

    Keeps the best ``k + BF16_MARGIN`` candidates by ``scores``, rescores them as
    ``xs . w[id] (+ b[id])`` with ``xs`` ``(..., n, d)``, ``w`` ``(..., C, d)`` and ``b``
    ``(..., C)`` in fp32, and returns their best k, best first. Candidates scored ``-inf``
    (banned by an edit) stay ``-inf``.
    """
    *lead, n, c = scores.shape
    d = w.shape[-1]
    m = min(c, k + BF16_MARGIN)
    cand = topk_indices(scores, m).reshape(-1, n, m)  # (L, n, m)
    groups = cand.shape[0]
    flat = cand + (torch.arange(groups, device=cand.device) * c).view(-1, 1, 1)
    wc = w.reshape(-1, d)[flat]  # (L, n, m, d)
    exact = (wc * xs.reshape(groups, n, 1, d)).sum(-1)  # (L, n, m)
    if b is not None:
        exact += b.reshape(-1)[flat]
    banned = scores.reshape(groups, n, c).gather(-1, cand) == float("-inf")
    exact = exact.masked_fill(banned, float("-inf"))
    best = exact.topk(k, dim=-1).indices
    return cand.gather(-1, best).view(*lead, n, k)


def _check_options(
    *,
    dim: int,
    num_codes: int,
    k: int,
    groups: int,
    similarity: str,
    reduction: str,
    nonfinite: str,
    score_dtype: str,
    recon_weight: float,
    commitment_weight: float,
    revival_noise: float,
    chunk_size: int,
    recent_size: int,
    dead_code_steps: int,
    kmeans_iters: int,
    layer_norm: bool,
    layer_norm_affine: bool,
) -> None:
    """Raise ``ValueError`` for any invalid ``CodebookLayer`` option or combination."""
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
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    check_choice("score_dtype", score_dtype, SCORE_DTYPES)
    check_range("recon_weight", recon_weight, 0.0)
    check_range("commitment_weight", commitment_weight, 0.0)
    check_range("revival_noise", revival_noise, 0.0)
    for name, value in (("chunk_size", chunk_size), ("recent_size", recent_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
    if dead_code_steps < 0 or kmeans_iters < 0:
        raise ValueError("dead_code_steps and kmeans_iters must be >= 0")
    if layer_norm_affine and not layer_norm:
        raise ValueError(
            "layer_norm_affine=True is invalid with layer_norm=False; the affine weight and "
            "bias belong to the input LayerNorm, so set layer_norm=True too"
        )


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
        layer_norm_affine: give that LayerNorm a learned weight and bias per group, parameters
            ``ln_weight``/``ln_bias`` of shape ``(groups, head_dim)`` (the reference code's
            LayerNorm); needs ``layer_norm``.
        kmeans_init: run k-means on the first training batch to initialise the codes.
        kmeans_iters: Lloyd iterations for k-means.
        dead_code_steps: revive codes unused for this many ``step()`` calls (0 = off).
        revival_noise: relative noise added to revived codes.
        chunk_size: (token, group) rows scored at once; bounds extra memory to about
            ``chunk_size * num_codes`` fp32 scores.
        recent_size: recent inputs kept per group for revival.
        grouped: return codes with a group axis even if ``groups == 1``.
        nonfinite: NaN/inf inputs 'raise' ``NonFiniteInputError`` (default; a host sync per
            forward on GPU) or are 'skip'ped: passed through unquantized, code ``-1``, kept
            out of the loss, the statistics and the revival buffer (no host sync).
        score_dtype: 'float32' (exact search) or 'bfloat16': score in bf16, then re-rank the
            best ``k + BF16_MARGIN`` candidates exactly in fp32 (for bf16 matrix hardware).
            'auto' (default): fp32, unless the device has bf16 matrix units
            (``bf16_matrix_units``) and, on the first search of at least ``AUTO_CHECK_SCORES``
            scores, bf16 gives exactly the fp32 codes in less than ``AUTO_BF16_GAIN`` of its
            time; ``score_dtype_reason`` says what was chosen and why.
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
    skipped: Tensor

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
        layer_norm_affine: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        revival_noise: float = 0.01,
        chunk_size: int = 2048,
        recent_size: int = 2048,
        grouped: bool | None = None,
        seed: int | None = None,
        nonfinite: str = "raise",
        score_dtype: str = "auto",
    ) -> None:
        super().__init__()
        _check_options(
            dim=dim,
            num_codes=num_codes,
            k=k,
            groups=groups,
            similarity=similarity,
            reduction=reduction,
            nonfinite=nonfinite,
            score_dtype=score_dtype,
            recon_weight=recon_weight,
            commitment_weight=commitment_weight,
            revival_noise=revival_noise,
            chunk_size=chunk_size,
            recent_size=recent_size,
            dead_code_steps=dead_code_steps,
            kmeans_iters=kmeans_iters,
            layer_norm=layer_norm,
            layer_norm_affine=layer_norm_affine,
        )
        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.head_dim = dim // groups
        self.similarity, self.reduction = similarity, reduction
        self.recon_weight, self.commitment_weight = recon_weight, commitment_weight
        self.layer_norm, self.kmeans_init, self.kmeans_iters = layer_norm, kmeans_init, kmeans_iters
        self.dead_code_steps, self.revival_noise = dead_code_steps, revival_noise
        self.chunk_size, self.recent_size = chunk_size, recent_size
        self.grouped = groups > 1 if grouped is None else grouped
        self.nonfinite = nonfinite
        self.score_dtype = score_dtype
        self._score_low = score_dtype == "bfloat16"  # what the search uses ('auto': decided later)
        self.score_dtype_reason = (
            "undecided: no search large enough to check yet"
            if score_dtype == "auto"
            else f"{score_dtype}: as given"
        )
        """Why the search scores in the dtype it does (for ``score_dtype='auto'``)."""
        self._init_parameters(seed, layer_norm_affine)
        self._init_buffers()

        self.edit: CodeEdit | None = None
        """An active intervention (set by ``intervene``); ``None`` means plain top-k."""
        self.last_loss: Tensor | None = None
        """Loss of the latest forward pass (read by ``CodebookModel.codebook_loss``)."""
        self._faiss: FaissIndex | None = None
        self._score_cache: tuple[Any, Tensor, Tensor | None] | None = None
        self._offsets: Tensor | None = None
        self._grad_buffer = _GradBuffer()
        self._search_threads = 0  # threads for the search while a small call runs on one

    def _init_parameters(self, seed: int | None, layer_norm_affine: bool) -> None:
        """The codes ``(groups, C, head_dim)``, and the input LayerNorm's weight and bias."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init = torch.randn(self.groups, self.num_codes, self.head_dim, generator=gen)
        # Unit-variance inputs have norm ~sqrt(head_dim); start codes at that scale.
        self.codebook = nn.Parameter(init)
        self.ln_weight: nn.Parameter | None = None
        self.ln_bias: nn.Parameter | None = None
        if layer_norm_affine:  # only then in the state dict: older checkpoints still load
            self.ln_weight = nn.Parameter(torch.ones(self.groups, self.head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(self.groups, self.head_dim))

    def _init_buffers(self) -> None:
        """Usage statistics, the revival buffer, and their host-side mirrors."""
        g, c, d = self.groups, self.num_codes, self.head_dim
        recent = self.recent_size if self.dead_code_steps else 0
        self.register_buffer("counts", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("usage", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("steps_unused", torch.zeros(g, c, dtype=torch.int64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mse_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("revived", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        self.register_buffer("recent", torch.zeros(g, recent, d))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.int64))
        # Not persistent: checkpoints written before this counter existed still load.
        self.register_buffer("skipped", torch.zeros((), dtype=torch.int64), persistent=False)
        # Host-side mirrors of small buffers so the hot path never syncs to read them.
        self._initialized = not self.kmeans_init
        self._recent_filled = 0
        self._recent_ptr = 0
        self.register_load_state_dict_post_hook(_refresh_mirrors)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, groups={self.groups}, "
            f"similarity={self.similarity!r}, reduction={self.reduction!r}"
        )

    # ----------------------------------------------------------------- search
    def _score_params(self) -> tuple[Tensor, Tensor | None]:
        """Weights ``(groups, C, d)`` and bias ``(groups, C)`` (fp32) so that ranking by
        ``x @ w.T + b`` equals ranking by the chosen similarity.

        In eval mode they are cached until the codebook changes (in-place updates such as
        ``copy_``/optimizer steps bump its version; writes through ``.data`` do not, so call
        ``train()``/``eval()`` after those), so that generation, one token at a time, does not
        renormalise every code on every call. Training recomputes them on every use (the tiled
        CPU search prepares one group at a time instead, see ``_search_tiled``).
        """
        cb = self.codebook.detach()
        key = (cb.data_ptr(), cb._version, cb.device, cb.dtype, self.similarity)
        cache = self._score_cache
        if not self.training and cache is not None and cache[0] == key:
            return cache[1], cache[2]
        w, bias = self._prepare(cb.float())
        self._score_cache = None if self.training else (key, w, bias)
        return w, bias

    def _prepare(self, cb: Tensor) -> tuple[Tensor, Tensor | None]:
        """Ranking weights and bias for fp32 codes ``cb`` ``(..., C, d)`` (see ``_score_params``)."""
        if self.similarity == "cosine":
            # |x| is constant per token, so x.c/|c| ranks the same as cosine.
            return _unit_codes(cb), None
        if self.similarity == "euclidean":
            # -|x - c|^2 = 2 x.c - |c|^2 - |x|^2; drop the per-token constant and halve.
            return cb, _neg_half_sq_norm(cb)
        return cb, None

    def train(self, mode: bool = True) -> CodebookLayer:
        self._score_cache = None
        if not mode:  # no backward expected: give the reusable gradient's memory back
            self._grad_buffer = _GradBuffer()
        return super().train(mode)

    @torch.no_grad()
    def search(
        self, x: Tensor, k: int | None = None, lead_shape: tuple[int, ...] | None = None
    ) -> Tensor:
        """Top-k code ids for ``x`` of shape ``(tokens, groups, head_dim)`` -> ``(tokens, groups, k)``.

        Scores are fp32 whatever the input dtype or autocast state (``score_dtype='bfloat16'``:
        bf16 scores, then the best ``k + BF16_MARGIN`` re-ranked in fp32) and are never kept.
        On CPU they are made in tiles of one group's rows (about ``_TILE_BYTES``, at most
        ``chunk_size`` rows), each scored and reduced to its top k by one thread while it is in
        cache, the tiles shared out to ``torch.get_num_threads()`` threads. On other devices,
        for searches too small to share out, and while an edit is active (``CodeEdit`` sees
        every group of a chunk at once), ``chunk_size // groups`` rows of all groups are scored
        in one batched product. Peak extra memory is about ``chunk_size * num_codes`` floats
        whatever the number of tokens. Uses the FAISS index instead when one was built
        (``build_index``), the layer is in eval mode and no edit is active.
        """
        k = self.k if k is None else k
        n_tok, g, c = x.shape[0], self.groups, self.num_codes
        lead_shape = (n_tok,) if lead_shape is None else lead_shape
        if self._faiss is not None and not self.training and self.edit is None and n_tok:
            self._faiss.refresh(self.codebook._version, self._index_vectors)
            return self._faiss.search(x, k)
        out = torch.empty(n_tok, g, k, dtype=torch.int64, device=x.device)
        if n_tok == 0:
            return out
        with torch.autocast(x.device.type, enabled=False):
            undecided = self.score_dtype_reason.startswith("undecided")
            if undecided and n_tok * g * c >= AUTO_CHECK_SCORES and self.edit is None:
                self._choose_score_dtype(x, k, lead_shape)
            self._search_into(x, k, lead_shape, out)
        return out

    def _search_into(self, x: Tensor, k: int, lead_shape: tuple[int, ...], out: Tensor) -> None:
        n_tok, g, c = x.shape[0], self.groups, self.num_codes
        small = n_tok * g * c <= _SMALL_SEARCH and self.codebook.numel() <= _SMALL_SEARCH
        if self.edit is not None or x.device.type != "cpu" or small:
            self._search_batched(x, k, lead_shape, out)
        else:
            self._search_tiled(x, k, out)

    def _bf16_scores(self) -> bool:
        """Whether the search scores in bf16 now (``score_dtype`` may be set after init)."""
        return self._score_low if self.score_dtype == "auto" else self.score_dtype == "bfloat16"

    def _choose_score_dtype(self, x: Tensor, k: int, lead_shape: tuple[int, ...]) -> None:
        """``score_dtype='auto'``: bf16 if the device has bf16 units and, on ``x``, bf16 gives
        the fp32 codes exactly in less than ``AUTO_BF16_GAIN`` of fp32's time; else fp32."""
        has_units, why = bf16_matrix_units(x.device)
        if not has_units:
            self._score_low, self.score_dtype_reason = False, f"float32: {why}"
            return
        runs: dict[bool, tuple[float, Tensor]] = {}
        for low in (False, True, False, True):  # the second round of each is timed
            self._score_low = low
            codes = torch.empty(x.shape[0], self.groups, k, dtype=torch.int64, device=x.device)
            _sync(x.device)
            t0 = time.perf_counter()
            self._search_into(x, k, lead_shape, codes)
            _sync(x.device)
            runs[low] = (time.perf_counter() - t0, codes)
        (t32, exact), (t16, approx) = runs[False], runs[True]
        same = torch.equal(exact.sort(-1).values, approx.sort(-1).values)
        self._score_low = same and t16 < AUTO_BF16_GAIN * t32
        self.score_dtype_reason = (
            f"{'bfloat16' if self._score_low else 'float32'}: {why}; bf16 codes "
            f"{'equal' if same else 'differ from'} the fp32 ones on the check "
            f"({x.shape[0]} tokens), bf16 search {t16:.4f} s against fp32 {t32:.4f} s"
        )

    def _search_batched(self, x: Tensor, k: int, lead_shape: tuple[int, ...], out: Tensor) -> None:
        """``search`` as ``(G, n, C)`` batched products over chunks of all groups' rows."""
        n_tok, g, c = x.shape[0], self.groups, self.num_codes
        step = max(1, min(self.chunk_size // g, n_tok))
        low = self._bf16_scores()
        w, b = self._score_params()
        wt = (w.bfloat16() if low else w).transpose(1, 2)  # (G, d, C): a view, read transposed
        bias = None if b is None else b.unsqueeze(1)  # (G, 1, C)
        dtype = torch.bfloat16 if low else torch.float32
        buf = torch.empty(g * step * c, dtype=dtype, device=x.device)
        xt = x.transpose(0, 1)  # (G, tokens, d), a view
        for start in range(0, n_tok, step):
            rows = slice(start, min(start + step, n_tok))
            xs = xt[:, rows].float()
            n = xs.shape[1]
            scores = buf[: g * n * c].view(g, n, c)  # (G, n, C) for this chunk only
            if low:
                torch.bmm(xs.bfloat16(), wt, out=scores)
                if bias is not None:
                    scores.add_(bias)
            elif bias is None:
                torch.bmm(xs, wt, out=scores)
            else:
                torch.baddbmm(bias, xs, wt, out=scores)
            if self.edit is not None:
                scores = self.edit.edit_scores(scores, rows, lead_shape)
            codes = rerank(scores, xs, w, b, k) if low else topk_indices(scores, k)
            out[rows] = codes.transpose(0, 1)

    def _search_tiled(self, x: Tensor, k: int, out: Tensor) -> None:
        """``search`` on CPU: one-group tiles shared out to threads (see ``search``)."""
        n_tok, g = x.shape[0], self.groups
        threads = self._search_threads or torch.get_num_threads()
        rows = tile_rows(self.num_codes, self.chunk_size)
        # Row ranges per group: enough tasks to keep every thread busy to the end, each
        # preparing its group's codes once (C x d: little next to its range's products).
        parts = max(1, min(-(-n_tok // rows), -(-4 * threads // g) if threads > 1 else 1))
        bounds = [n_tok * i // parts for i in range(parts + 1)]
        # Eval mode keeps prepared weights between calls; training prepares them per task from
        # the live codes (one group's, while they are in cache), never the whole codebook.
        prepared = None if self.training else self._score_params()
        cb = self.codebook.detach()
        xt = x.transpose(0, 1)  # (G, tokens, d), a view

        def task(gi: int, lo: int, hi: int) -> Callable[[], None]:
            return lambda: self._score_tiles(xt[gi], cb[gi], prepared, gi, lo, hi, k, rows, out)

        run_parallel(
            [task(gi, bounds[i], bounds[i + 1]) for gi in range(g) for i in range(parts)],
            threads,
        )

    def _score_tiles(
        self,
        xg: Tensor,
        cbg: Tensor,
        prepared: tuple[Tensor, Tensor | None] | None,
        gi: int,
        lo: int,
        hi: int,
        k: int,
        rows: int,
        out: Tensor,
    ) -> None:
        """Write ``out[lo:hi, gi]``: group ``gi``'s top k for token rows ``lo:hi`` of ``xg``
        ``(tokens, d)``, scored ``rows`` at a time into one tile."""
        if prepared is None:
            w, b = self._prepare(cbg.float())
        else:
            w, b = prepared[0][gi], None if prepared[1] is None else prepared[1][gi]
        low = self._bf16_scores()
        c = self.num_codes
        nb_b, nb, nbp = (0, 0, 0) if low or b is not None else _top1_padded_layout(c, k)
        if nb_b:  # zero codes in the pad columns: see _top1_padded
            w = torch.cat([w.view(nb_b, nb, -1), w.new_zeros(nb_b, nbp - nb, w.shape[-1])], 1)
            w, c = w.view(nb_b * nbp, -1), nb_b * nbp
        wt = (w.bfloat16() if low else w).t()  # (d, C), a view
        tile = _tile(min(rows, hi - lo) * c, torch.bfloat16 if low else torch.float32)
        for s in range(lo, hi, rows):
            e = min(s + rows, hi)
            xs = xg[s:e].float()  # (n, d)
            scores = tile[: (e - s) * c].view(e - s, c)
            if low:
                torch.mm(xs.bfloat16(), wt, out=scores)
                if b is not None:
                    scores.add_(b)
                out[s:e, gi] = rerank(scores, xs, w, b, k)
            else:
                if b is None:
                    torch.mm(xs, wt, out=scores)
                else:
                    torch.addmm(b, xs, wt, out=scores)
                if nb_b:
                    out[s:e, gi] = _top1_padded(scores, nb_b, nb)
                else:
                    out[s:e, gi] = topk_indices(scores, k)

    # ------------------------------------------------------------------ faiss
    def build_index(self, *, nlist: int = 0, nprobe: int = 8) -> None:
        """Search with a FAISS index (``pip install faiss-cpu``) in eval mode.

        ``nlist=0`` builds exact flat indexes (one per group): the same codes as ``search``,
        computed by FAISS's blocked BLAS + heap top-k. ``nlist > 0`` builds IVF indexes with
        ``nlist`` cells probed ``nprobe`` at a time: approximate, faster for very many codes.
        The index follows codebook updates (it is rebuilt when the codes change); inputs on
        a GPU are searched on the CPU. ``drop_index()`` returns to the exact torch search.
        """
        if (
            isinstance(nlist, bool)
            or not isinstance(nlist, int)
            or not 0 <= nlist <= self.num_codes
        ):
            raise ValueError(
                f"nlist={nlist!r} is invalid; it must be an integer in [0, {self.num_codes}] "
                "(0 = exact flat index)"
            )
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(f"nprobe={nprobe!r} is invalid; it must be an integer >= 1")
        self._faiss = FaissIndex(nlist, nprobe)
        self._faiss.refresh(self.codebook._version, self._index_vectors)

    def _index_vectors(self) -> tuple[Tensor, bool]:
        """What the FAISS index ranks by: ``(groups, C, d)`` fp32 vectors, and whether by L2."""
        w, b = self._score_params()
        if b is not None:
            # Euclidean: rank by -|x - c|^2, which is what an L2 index returns (ascending).
            return self.codebook.detach().float(), True
        return w, False

    def drop_index(self) -> None:
        """Forget the FAISS index; ``search`` goes back to exact chunked torch scoring."""
        self._faiss = None

    # ---------------------------------------------------------------- decode
    def decode(self, codes: Tensor, weights: Tensor | None = None) -> Tensor:
        """Code ids ``(..., groups, k)`` (or ``(..., k)`` ungrouped) -> output ``(..., dim)``.

        Differentiable with respect to the codebook. ``weights`` scales each chosen code.
        Floating-point ``codes`` are dense latent activations ``(..., groups * num_codes)``
        (the SAE view, see ``encode``) and decode to ``codes @ W_dec``.
        """
        if codes.is_floating_point():
            return self._decode_latents(codes, weights)
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
        """Quantize ``x`` of shape ``(..., dim)``; see ``CodebookOutput``.

        Autocast is off inside: codes are chosen on fp32 scores and the output is the exact
        decoding of its codes, returned in the input's dtype.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} does not match dim={self.dim}")
        threads = torch.get_num_threads()
        small = x.device.type == "cpu" and threads > 1 and x.numel() <= SMALL_CALL_ELEMENTS
        with torch.autocast(x.device.type, enabled=False):
            if not small:
                return self._forward(x)
            self._search_threads = threads
            try:
                with one_cpu_thread(x.device):
                    res = self._forward(x, one_thread_backward=torch.is_grad_enabled())
            finally:
                self._search_threads = 0
            return res

    def _forward(self, x: Tensor, one_thread_backward: bool = False) -> CodebookOutput:
        lead = tuple(x.shape[:-1])
        in_dtype = x.dtype
        xg = x.reshape(-1, self.groups, self.head_dim).to(self.codebook.dtype)  # (N, G, d)
        gate = _OneThreadBackward() if one_thread_backward else None
        if gate is not None and xg.requires_grad:
            # The input's gradient is the last this call computes: back to every thread then.
            xg = xg.view_as(xg)
            xg.register_hook(gate.leave_hook)
        if self.layer_norm:
            xg = F.layer_norm(xg, (self.head_dim,))
            if self.ln_weight is not None and self.ln_bias is not None:
                xg = xg * self.ln_weight + self.ln_bias  # (N, G, d) * (G, d): per-group affine
        xd = xg.detach()
        bad: Tensor | None = None  # (N, G) slices holding NaN/inf, with nonfinite='skip'
        if self.nonfinite == "raise":
            self._check_finite(xd, lead)
        else:
            bad = ~torch.isfinite(xd).all(-1)
            # Zeroed so that nothing below (scores, loss, stats, revival) ever sees NaN/inf.
            xd = torch.where(bad.unsqueeze(-1), 0.0, xd)
        if self.training and not self._initialized:
            # Under torch.distributed: k-means on the global batch, rank 0's result everywhere.
            self.init_kmeans(distributed.all_gather_rows(xd if bad is None else xd[~bad.any(-1)]))
            distributed.broadcast_(self.codebook.data)

        codes = self.search(xd, lead_shape=lead)  # (N, G, k)
        weights = None
        if self.edit is not None:
            codes, weights = self.edit.edit_codes(codes, lead)
        q = self._decode_flat(codes, weights)  # (N, G, d)

        # Reconstruction: gradient to the codes only; also feeds the mse statistic.
        qr = q if self.recon_weight else q.detach()
        if bad is None:
            recon = _mse(qr, xd)
        else:
            keep = (~bad).unsqueeze(-1).to(q.dtype)  # (N, G, 1)
            n_keep = keep.sum()
            recon = ((qr - xd).pow(2) * keep).sum() / (n_keep * self.head_dim).clamp_min(1)
        loss = self.recon_weight * recon if self.recon_weight else q.new_zeros(())
        if self.commitment_weight:
            xc = xg if bad is None else torch.where(bad.unsqueeze(-1), 0.0, xg)
            if bad is None:
                loss = loss + self.commitment_weight * _mse(xc, q.detach())
            else:
                err = ((xc - q.detach()).pow(2) * keep).sum() / (n_keep * self.head_dim).clamp_min(
                    1
                )
                loss = loss + self.commitment_weight * err
        self.last_loss = loss
        self._update_stats(xd, codes, recon.detach(), bad)

        # Value is exactly q; gradient flows to both q (codes) and x (straight-through).
        out = q + (xg - xd) if torch.is_grad_enabled() else q
        if bad is not None:
            # Skipped slices pass through; their codes get no gradient from the output.
            out = torch.where(bad.unsqueeze(-1), xg, out)
            codes = codes.masked_fill(bad.unsqueeze(-1), -1)
        out = out.reshape(*lead, self.dim).to(in_dtype)
        if gate is not None and (out.requires_grad or loss.requires_grad):
            out, loss = _EnterOneThread.apply(out, loss, gate)
            self.last_loss = loss
        codes_out = codes.reshape(*lead, self.groups, codes.shape[-1])
        if not self.grouped:
            codes_out = codes_out.squeeze(-2)
        return CodebookOutput(out, codes_out, loss)

    def _check_finite(self, x: Tensor, lead: tuple[int, ...]) -> None:
        """Raise ``NonFiniteInputError`` if ``x`` holds NaN/inf (one cheap reduction).

        A sum is finite whenever every element is (barring overflow, which then takes the
        exact path); only the failing case pays for locating the bad tokens.
        """
        if x.numel() == 0 or math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all()):
            return
        bad_tok = ~torch.isfinite(x).flatten(1).all(-1)  # (N,)
        n_bad = int(bad_tok.sum())
        first = int(bad_tok.nonzero()[0, 0])
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), lead)) if lead else ()
        raise NonFiniteInputError(
            f"CodebookLayer(dim={self.dim}, num_codes={self.num_codes}, groups={self.groups}): "
            f"the input holds NaN/inf in {n_bad} of {x.shape[0]} tokens (first at position "
            f"{pos} of shape {lead}); nothing was updated. Fix the activations upstream "
            "(learning rate, fp16 overflow), or set nonfinite='skip' to pass such tokens "
            "through unquantized"
        )

    def _group_offsets(self, device: torch.device) -> Tensor:
        """``(1, G, 1)`` offsets ``g * num_codes`` into the flattened ``(G * C, d)`` table."""
        cached = self._offsets
        if cached is None or cached.device != device:
            cached = torch.arange(self.groups, device=device).view(1, -1, 1) * self.num_codes
            self._offsets = cached
        return cached

    def _decode_flat(self, codes: Tensor, weights: Tensor | None) -> Tensor:
        """``(N, G, k')`` ids -> ``(N, G, d)`` vectors, differentiable w.r.t. the codebook.

        Sums each token's codes without materialising ``(N, G, k', d)`` (see ``_BagSum``).
        """
        n, g, kk = codes.shape
        offsets = self._group_offsets(codes.device)
        table = self.codebook.reshape(g * self.num_codes, self.head_dim)
        bags = (codes + offsets).reshape(n * g, kk)
        psw = None if weights is None else weights.reshape(n * g, kk).to(table.dtype)
        if torch.is_grad_enabled() and (
            table.requires_grad or (psw is not None and psw.requires_grad)
        ):
            q = _BagSum.apply(table, bags, psw, self._grad_buffer)
        else:  # inference: skip the autograd.Function overhead (it matters per generated token)
            q = F.embedding_bag(bags, table, per_sample_weights=psw, mode="sum")
        q = q.view(n, g, self.head_dim)
        return q if self.reduction == "sum" else q / self.k

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def _update_stats(self, x: Tensor, codes: Tensor, mse: Tensor, bad: Tensor | None) -> None:
        """Count codes and accumulate the reconstruction error, all on device (no sync).

        ``mse`` is the mean squared error per element over the kept (token, group) slices.
        """
        codes = codes.clamp(0, self.num_codes - 1)
        offsets = self._group_offsets(codes.device)
        flat = (codes + offsets).reshape(-1)
        if bad is None:
            ones = torch.ones_like(flat)
            kept: Tensor | float = float(x.shape[0] * self.groups)
        else:
            keep = ~bad  # (N, G)
            ones = keep.unsqueeze(-1).expand_as(codes).reshape(-1).to(flat.dtype)
            kept = keep.sum()
            self.skipped += bad.sum()
        self.counts.view(-1).scatter_add_(0, flat, ones)
        self.tokens_seen += x.shape[0]
        # mse_sum holds sum over tokens of the per-element error averaged over groups.
        self.mse_sum.add_(mse.double() * kept, alpha=1 / self.groups)
        if self.training:
            self.usage.view(-1).scatter_add_(0, flat, ones)
            if self.dead_code_steps:
                self._remember(x if bad is None else _fill_bad_rows(x, bad))

    @torch.no_grad()
    def _remember(self, x: Tensor) -> None:
        """Keep a ring buffer of recent inputs (per group) to revive dead codes from."""
        size = self.recent_size
        # Under torch.distributed the buffer holds rows of the global batch, same on all ranks.
        n = distributed.total_rows(x)
        if n >= size:
            self.recent.copy_(distributed.sample_rows(x, size).transpose(0, 1))
            self._recent_ptr, self._recent_filled = 0, size
        else:
            x = distributed.all_gather_rows(x)
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
        distributed.sync_usage(self)  # global usage before the dead-code decision
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
        if distributed.active() and distributed.any_true(dead):
            distributed.broadcast_(fresh)  # rank 0 chooses the replacement vectors
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
        self.skipped.zero_()

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
        skipped = int(self.skipped)
        kept = tokens * self.groups - skipped  # (token, group) slices that were quantized
        return LayerStats(
            counts=counts,
            tokens=tokens,
            dead_fraction=float(dead.double().mean()),
            entropy=ent,
            perplexity=math.exp(ent),
            mse=float(self.mse_sum) * self.groups / max(kept, 1),
            revived=int(self.revived),
            skipped=skipped,
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

    # ----------------------------------------------------- dictionary (SAE) view
    @property
    def W_dec(self) -> Tensor:
        """Decoder rows ``(groups * num_codes, dim)``, as a sparse autoencoder's.

        Latent ``g * num_codes + c`` is code ``c`` of group ``g``, placed in group ``g``'s slice
        of the width (zeros elsewhere: block diagonal); ungrouped it is the codebook itself.
        """
        return torch.block_diag(*self.codebook.unbind(0))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Activations ``(..., dim)`` -> latent activations ``(..., groups * num_codes)``.

        ``1.0`` at each chosen code (``1 / k`` with ``reduction='mean'``), ``0`` elsewhere, so
        ``decode(encode(x))`` equals ``forward(x).output``. Grouped layers number code ``c`` of
        group ``g`` as latent ``g * num_codes + c`` (see ``W_dec``): each token fires ``k``
        latents per head. Plain top-k: no statistics are updated and an active ``edit`` is
        ignored. With ``nonfinite='skip'`` a (token, group) slice holding NaN/inf fires nothing.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} does not match dim={self.dim}")
        lead, (g, c) = tuple(x.shape[:-1]), (self.groups, self.num_codes)
        xg = x.reshape(-1, g, self.head_dim).to(self.codebook.dtype)  # (N, G, d)
        if self.layer_norm:
            xg = F.layer_norm(xg, (self.head_dim,))
            if self.ln_weight is not None and self.ln_bias is not None:
                xg = xg * self.ln_weight + self.ln_bias
        if self.nonfinite == "raise":
            self._check_finite(xg, lead)
        bad = ~torch.isfinite(xg).all(-1, keepdim=True)  # (N, G, 1)
        edit, self.edit = self.edit, None
        try:
            codes = self.search(torch.where(bad, 0.0, xg), lead_shape=lead)  # (N, G, k)
        finally:
            self.edit = edit
        z = xg.new_zeros(xg.shape[0], g, c)
        z.scatter_(-1, codes, 1.0 if self.reduction == "sum" else 1.0 / self.k)
        return z.masked_fill_(bad, 0.0).reshape(*lead, g * c)

    def _decode_latents(self, z: Tensor, weights: Tensor | None = None) -> Tensor:
        """Latent activations ``(..., groups * num_codes)`` -> ``z @ W_dec`` ``(..., dim)``."""
        g, c = self.groups, self.num_codes
        if weights is not None:
            raise ValueError("weights are for code ids; dense latent activations carry their own")
        if z.shape[-1] != g * c:
            raise ValueError(
                f"latent activations have width {z.shape[-1]}; this codebook has "
                f"groups * num_codes = {g * c} latents"
            )
        zg = z.reshape(-1, g, c).to(self.codebook.dtype)
        q = torch.einsum("ngc,gcd->ngd", zg, self.codebook)  # one (C, d) block per group
        return q.reshape(*z.shape[:-1], self.dim)


def _refresh_mirrors(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, CodebookLayer)
    module._initialized = bool(module.initialized)
    module._recent_filled = int(module.recent_filled)
    module._recent_ptr = module._recent_filled % max(module.recent_size, 1)


class _BagSum(torch.autograd.Function):
    """``out[m] = sum_j w[m, j] * table[bags[m, j]]``: ``(R, d)``, ``(M, k)`` -> ``(M, d)``.

    Forward is one ``embedding_bag``. Backward scatters the output gradient into the table
    with one ``index_add_`` per slot ``j``, with no ``(M, k, d)`` temporary. On CPU it runs
    on one thread: single-threaded it is 2-3x faster than ``embedding_bag``'s sort-based
    backward, while torch's 2-thread row scatter splits each row between threads that then
    fight over the same cache lines (measured 50-100x slower; benchmarks/README.md). With a
    ``buffer`` the table's gradient starts from a reused zero tensor (see ``_GradBuffer``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        table: Tensor,
        bags: Tensor,
        weights: Tensor | None,
        buffer: _GradBuffer | None = None,
    ) -> Tensor:
        ctx.save_for_backward(table, bags, weights)
        ctx.buffer = buffer
        return F.embedding_bag(bags, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        table, bags, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            buffer: _GradBuffer | None = ctx.buffer
            zeros = torch.zeros_like(table) if buffer is None else buffer.zeros(table)
            g = grad.to(table.dtype)
            with one_cpu_thread(table.device):
                for j in range(bags.shape[1]):
                    src = g if weights is None else g * weights[:, j : j + 1]
                    zeros.index_add_(0, bags[:, j], src)
            if buffer is not None:
                buffer.written(zeros, bags.reshape(-1))
            # A fresh tensor object over the same memory: autograd adopts it as ``.grad``
            # without a copy, and the buffer sees the adoption as a second storage reference.
            grad_table = zeros.view_as(zeros)
        if weights is not None and ctx.needs_input_grad[2]:
            grad_weights = (grad.unsqueeze(1) * F.embedding(bags, table)).sum(-1)
        return grad_table, None, grad_weights, None


class _OneThreadBackward:
    """One small call's backward on one intra-op thread (see ``SMALL_CALL_ELEMENTS``).

    ``_EnterOneThread`` (on the call's outputs) switches to one thread when the backward
    reaches the call; the hook on the call's input switches back once its gradient is made,
    and the end of the backward pass does so in any case (an input without gradient, an
    error). Nested calls share one switch: the outermost saved count is restored.
    """

    depth = 0
    saved = 0

    def __init__(self) -> None:
        self.entered = False

    def enter(self) -> None:
        if self.entered:
            return
        self.entered = True
        cls = _OneThreadBackward
        if cls.depth == 0:
            cls.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        cls.depth += 1
        # Runs when this backward pass ends, whatever it reached.
        torch.autograd.Variable._execution_engine.queue_callback(self.leave)

    def leave(self) -> None:
        if not self.entered:
            return
        self.entered = False
        cls = _OneThreadBackward
        cls.depth -= 1
        if cls.depth == 0:
            torch.set_num_threads(cls.saved)

    def leave_hook(self, grad: Tensor) -> None:
        self.leave()


class _EnterOneThread(torch.autograd.Function):
    """Identity on ``(output, loss)`` whose backward switches to one thread first."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, loss: Tensor, gate: _OneThreadBackward) -> Any:
        ctx.gate = gate
        ctx.set_materialize_grads(False)
        # Copies, not views: a caller may write into the output in place (a few KB here).
        res = out.clone(), loss.clone()
        pairs = zip(res, (out, loss), strict=True)
        ctx.mark_non_differentiable(*(r for r, t in pairs if not t.requires_grad))
        return res

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_loss: Tensor | None) -> Any:
        ctx.gate.enter()
        return g_out, g_loss, None


def _fill_bad_rows(x: Tensor, bad: Tensor) -> Tensor:
    """``x`` ``(N, G, d)`` with each group's ``bad`` rows replaced by its first good row.

    Keeps skipped (zeroed) slices out of the revival buffer without a host sync; a group with
    no good row keeps its zeros.
    """
    n, g, d = x.shape
    first_good = (~bad).to(torch.uint8).argmax(0)  # (G,): argmax returns the first maximum
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand(n, g)
    src = torch.where(bad, first_good.unsqueeze(0), rows)  # (N, G)
    return x.gather(0, src.unsqueeze(-1).expand(n, g, d))
