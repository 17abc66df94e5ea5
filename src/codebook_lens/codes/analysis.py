"""Codebook health, the single-neuron baseline and direct logit effects of codes.

- ``codebook_health``: per codebook usage counts, dead codes, usage entropy (from the cache's
  inverted index, no model needed); ``plot_health`` saves PNGs.
- ``best_neuron``: for activations ``(N, D)`` and a boolean label ``(N,)``, the single
  dimension and threshold (either sign) with the best F1, vectorised by sorting.
- ``neuron_baseline``: reruns the model over the cache's first tokens, captures the input of a
  codebook (the pre-quantization activation at the same site) and compares its best neuron with
  the best code on the same tokens.
- ``promoted_tokens`` (from ``direct_effect``): the output tokens a code's vector pushes up
  most (direct logit effect).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codebook_lens.codes.cache import CodeCache, check_identity
from codebook_lens.codes.direct_effect import PROMOTED_NOTE, PromotedToken, promoted_tokens
from codebook_lens.codes.search import CodeMatch, Pattern, code_hits, format_table

if TYPE_CHECKING:
    from torch import nn

    from codebook_lens.model.codebook_model import CodebookModel

__all__ = [
    "PROMOTED_NOTE",
    "CodebookHealth",
    "NeuronBaseline",
    "NeuronResult",
    "PromotedToken",
    "best_neuron",
    "best_neurons",
    "codebook_health",
    "format_health",
    "neuron_baseline",
    "plot_health",
    "promoted_tokens",
    "site_activations",
]


# -------------------------------------------------------------------- health
@dataclass
class CodebookHealth:
    """Usage of one codebook over the whole cache."""

    codebook: str
    placement: str
    groups: int
    num_codes: int
    k: int
    n_tokens: int
    used_codes: int
    """Codes (over all heads) that fire at least once."""
    dead_codes: int
    """Codes (over all heads) that never fire."""
    dead_fraction: float
    entropy: float
    """Usage entropy in nats, mean over heads."""
    max_entropy: float
    """log(num_codes): the entropy of uniform usage."""
    perplexity: float
    """exp(entropy): the effective number of codes in use per head."""
    top10_share: float
    """Fraction of all firings taken by the 10 most used codes (mean over heads)."""
    hist_edges: list[float]
    """Edges of log10(count) bins for the histogram of used codes."""
    hist_counts: list[int]
    """Used codes per bin."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def codebook_health(cache: CodeCache, codebooks: list[str] | None = None) -> list[CodebookHealth]:
    """Usage statistics for each codebook (default all), in cache order."""
    out = []
    for name in list(cache.codebooks) if codebooks is None else codebooks:
        cb = cache.info(name)
        counts = cache.code_counts(name).astype(np.float64)  # (G, C)
        total = counts.sum(axis=1, keepdims=True)
        p = counts / np.maximum(total, 1)
        ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        top = np.sort(p, axis=1)[:, ::-1][:, :10].sum(axis=1)
        used = counts[counts > 0]
        hi = max(1.0, float(np.log10(used.max()))) if used.size else 1.0
        edges = np.linspace(0.0, hi, 21)
        hist = np.histogram(np.log10(used), bins=edges)[0] if used.size else np.zeros(20)
        dead = int((counts == 0).sum())
        out.append(
            CodebookHealth(
                codebook=name,
                placement=cb.placement,
                groups=cb.groups,
                num_codes=cb.num_codes,
                k=cb.k,
                n_tokens=cache.n_tokens,
                used_codes=int(counts.size - dead),
                dead_codes=dead,
                dead_fraction=dead / counts.size,
                entropy=float(ent.mean()),
                max_entropy=math.log(cb.num_codes),
                perplexity=float(math.exp(ent.mean())),
                top10_share=float(top.mean()),
                hist_edges=[float(x) for x in edges],
                hist_counts=[int(x) for x in hist],
            )
        )
    return out


def format_health(stats: list[CodebookHealth]) -> str:
    """A readable table."""
    rows = [
        ("codebook", "heads", "C", "k", "used", "dead", "dead%", "entropy", "perplexity", "top10")
    ]
    for s in stats:
        rows.append(
            (
                s.codebook,
                str(s.groups),
                str(s.num_codes),
                str(s.k),
                str(s.used_codes),
                str(s.dead_codes),
                f"{100 * s.dead_fraction:.1f}",
                f"{s.entropy:.2f}/{s.max_entropy:.2f}",
                f"{s.perplexity:.1f}",
                f"{s.top10_share:.3f}",
            )
        )
    return format_table(rows)


def plot_health(
    cache: CodeCache, out_dir: str | Path, codebooks: list[str] | None = None
) -> list[Path]:
    """Save ``usage_<codebook>.png`` (rank-frequency and count histogram) for each codebook and
    ``summary.png`` (dead fraction and perplexity per codebook); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = codebook_health(cache, codebooks)
    paths = []
    for s in stats:
        counts = cache.code_counts(s.codebook)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        for h in range(s.groups):
            ranked = np.sort(counts[h])[::-1]
            ax1.plot(
                np.arange(1, len(ranked) + 1),
                np.maximum(ranked, 0.8),
                lw=1,
                label=f"head {h}" if s.groups > 1 else None,
            )
        ax1.set(
            xscale="log",
            yscale="log",
            xlabel="code rank",
            ylabel="tokens",
            title=f"{s.codebook}: usage by rank",
        )
        if 1 < s.groups <= 8:
            ax1.legend(fontsize=7)
        ax2.bar(s.hist_edges[:-1], s.hist_counts, width=np.diff(s.hist_edges), align="edge")
        ax2.set(
            xlabel="log10(tokens per code)",
            ylabel="codes",
            title=f"dead {s.dead_codes}/{s.groups * s.num_codes}, ppl {s.perplexity:.0f}",
        )
        fig.tight_layout()
        p = out / f"usage_{cache.info(s.codebook).file}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.4 * len(stats) + 1.5))
    names = [s.codebook for s in stats]
    ax1.barh(names, [s.dead_fraction for s in stats])
    ax1.set(xlabel="dead fraction", xlim=(0, 1))
    ax1.invert_yaxis()
    ax2.barh(names, [s.perplexity / s.num_codes for s in stats])
    ax2.set(xlabel="perplexity / num_codes")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.tight_layout()
    p = out / "summary.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    return paths


# ----------------------------------------------------------- neuron baseline
@dataclass
class NeuronResult:
    """The best single neuron for a label: it fires where ``sign * activation >= sign * threshold``."""

    neuron: int
    sign: int
    """+1: fires when activation >= threshold; -1: when activation <= threshold."""
    threshold: float
    precision: float
    recall: float
    f1: float
    count: int
    """Tokens on which the thresholded neuron fires."""
    hits: int


def best_neuron(
    acts: np.ndarray, labels: np.ndarray, *, chunk_elems: int = 1 << 24
) -> NeuronResult:
    """Best (neuron, sign, threshold) by F1 for ``acts`` ``(N, D)`` against ``labels`` ``(N,)``.

    Sorting each column once gives, for every cut, true positives by a cumulative sum, so all
    thresholds of all neurons are scored together; only cuts between distinct values count.
    """
    return best_neurons(acts, [labels], chunk_elems=chunk_elems)[0]


def best_neurons(
    acts: np.ndarray, labels: Sequence[np.ndarray], *, chunk_elems: int = 1 << 24
) -> list[NeuronResult]:
    """``best_neuron`` for several boolean labels over the same activations.

    The columns are sorted once and reused for every label, so many labels (e.g. one per FSM
    state) cost one sort plus a cumulative sum each.
    """
    acts = np.asarray(acts)
    labs = [np.asarray(lab, dtype=bool) for lab in labels]
    if acts.ndim != 2 or any(lab.shape != (acts.shape[0],) for lab in labs):
        shapes = sorted({lab.shape for lab in labs})
        raise ValueError(f"acts must be (N, D) and labels (N,); got {acts.shape} and {shapes}")
    n, d = acts.shape
    n_pos = [int(lab.sum()) for lab in labs]
    if any(p == 0 for p in n_pos):
        raise ValueError("labels has no positive token; the pattern does not occur in the tokens")
    best = [(-1.0, 0, 1, 0)] * len(labs)  # per label: f1, neuron, sign, cut index
    cols = max(1, chunk_elems // max(1, n))
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    for sign in (1, -1):
        for c0 in range(0, d, cols):
            x = sign * acts[:, c0 : c0 + cols].astype(np.float64)
            order = np.argsort(-x, axis=0, kind="stable")
            xs = np.take_along_axis(x, order, axis=0)
            invalid = np.zeros_like(xs, dtype=bool)
            invalid[:-1] = xs[:-1] <= xs[1:]  # a threshold can only cut between distinct values
            for li, lab in enumerate(labs):
                tp = np.cumsum(lab[order], axis=0)
                f1 = 2 * tp / (rank + n_pos[li])
                f1[invalid] = -1.0
                flat = int(np.argmax(f1))
                i, j = divmod(flat, f1.shape[1])
                if f1[i, j] > best[li][0]:
                    best[li] = (float(f1[i, j]), c0 + j, sign, i)
    out = []
    for li, (f1v, j, sign, i) in enumerate(best):
        col = sign * acts[:, j].astype(np.float64)
        thr = float(np.sort(col)[::-1][i])
        fires = col >= thr
        hits = int((fires & labs[li]).sum())
        count = int(fires.sum())
        out.append(
            NeuronResult(
                neuron=int(j),
                sign=int(sign),
                threshold=float(sign * thr),
                precision=hits / count,
                recall=hits / n_pos[li],
                f1=f1v,
                count=count,
                hits=hits,
            )  # fmt: skip
        )
    return out


def _batches(cache: CodeCache, limit: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    batch: list[tuple[int, int]] = []
    for w in cache.windows(limit):
        batch.append(w)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def window_inputs(tokens: np.ndarray, windows: Sequence[tuple[int, int]]) -> tuple[Any, Any]:
    """Token ids and attention mask ``(len(windows), longest)`` for windows ``[(start, end)]``
    of a cache's token array, right-padded with zeros (the windows the cache was built from)."""
    import torch

    width = max(e - s for s, e in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (s, e) in enumerate(windows):
        ids[i, : e - s] = torch.from_numpy(tokens[s:e].astype(np.int64))
        mask[i, : e - s] = 1
    return ids, mask


def site_activations(
    model: CodebookModel,
    cache: CodeCache,
    codebook: str,
    *,
    max_tokens: int = 50_000,
    batch_size: int = 8,
) -> np.ndarray:
    """Input of ``codebook`` (the activation before quantization) for the cache's first tokens.

    Runs the same windows as the cache build; returns ``(min(max_tokens, n_tokens), dim)``
    float32. ``ValueError`` if the cache was built with another model.
    """
    import torch

    from codebook_lens.model.codebook_model import eval_mode

    check_identity(cache, model)
    cache.info(codebook)
    layer = model.codebooks[codebook]
    n = min(max_tokens, cache.n_tokens)
    out = np.zeros((n, layer.dim), dtype=np.float32)
    captured: list[torch.Tensor] = []

    def grab(mod: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())

    device = next(model.parameters()).device
    handle = layer.register_forward_pre_hook(grab)
    tokens = np.asarray(cache.tokens)
    try:
        with eval_mode(model):  # each module's own mode comes back afterwards
            for batch in _batches(cache, n, batch_size):
                ids, mask = window_inputs(tokens, batch)
                captured.clear()
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
                x = captured[0].float().cpu().numpy()
                for i, (s, e) in enumerate(batch):
                    out[s:e] = x[i, : e - s]
    finally:
        handle.remove()
    return out


@dataclass
class NeuronBaseline:
    """Best neuron vs best code of one codebook for a pattern, on the same tokens."""

    codebook: str
    n_tokens: int
    """Tokens compared (the cache's first ones)."""
    pattern_tokens: int
    neuron: NeuronResult
    best_code: CodeMatch | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_neuron_baseline(baseline: NeuronBaseline) -> str:
    """The best neuron against the best code, as the ``search --neuron-baseline`` lines."""
    nb, bc = baseline.neuron, baseline.best_code
    op = ">=" if nb.sign > 0 else "<="
    lines = [
        f"neuron baseline at {baseline.codebook} on the first {baseline.n_tokens} tokens "
        f"({baseline.pattern_tokens} pattern tokens):",
        f"  best neuron {nb.neuron} (fires when activation {op} {nb.threshold:.4g}): "
        f"precision {nb.precision:.3f} recall {nb.recall:.3f} f1 {nb.f1:.3f}",
    ]
    if bc is not None:
        hd = "" if bc.head is None else f" head {bc.head}"
        lines.append(
            f"  best code {bc.code}{hd}: precision {bc.precision:.3f} "
            f"recall {bc.recall:.3f} f1 {bc.f1:.3f}"
        )
    return "\n".join(lines)


def neuron_baseline(
    model: CodebookModel,
    cache: CodeCache,
    pattern: Pattern,
    codebook: str,
    *,
    max_tokens: int = 50_000,
    batch_size: int = 8,
) -> NeuronBaseline:
    """Is the best code for ``pattern`` cleaner than the best neuron at the same site?"""
    acts = site_activations(model, cache, codebook, max_tokens=max_tokens, batch_size=batch_size)
    n = len(acts)
    pos = pattern.positions[pattern.positions < n]
    lab = np.zeros(n, dtype=bool)
    lab[pos] = True
    neuron = best_neuron(acts, lab)
    cb = cache.info(codebook)
    hits = code_hits(cache, codebook, pos).ravel()
    counts = code_hits(cache, codebook, np.arange(n)).ravel()
    f1 = 2 * hits / np.maximum(counts + len(pos), 1)
    i = int(np.argmax(f1))
    best = None
    if hits[i] > 0:
        best = CodeMatch(
            codebook=codebook,
            code=i % cb.num_codes,
            head=i // cb.num_codes if cb.grouped else None,
            precision=float(hits[i] / counts[i]),
            recall=float(hits[i] / len(pos)),
            f1=float(f1[i]),
            count=int(counts[i]),
            hits=int(hits[i]),
        )
    return NeuronBaseline(codebook, n, len(pos), neuron, best)
