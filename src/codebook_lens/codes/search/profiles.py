"""What one code fires on: its tokens, document labels, contexts, similar codes, a profile.

Reverse search, from a code to the text: every result is a dataclass of plain Python values
(``asdict`` gives JSON-ready dicts).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.direct_effect import PromotedToken, promoted_tokens


@dataclass
class TokenCount:
    """A token a code fires on."""

    token_id: int
    text: str
    count: int
    """Firings of the code on this token."""
    share: float
    """count / all firings of the code (precision of 'this token' for the code)."""
    coverage: float
    """count / occurrences of the token in the cache (recall of the code for the token)."""


@dataclass
class LabelCount:
    """Firings of a code inside documents of one label."""

    label: str | None
    count: int
    share: float
    """count / all firings of the code."""
    coverage: float
    """count / tokens in documents with this label."""


def code_tokens(
    cache: CodeCache, codebook: str, code: int, head: int | None = None, *, top: int = 20
) -> list[TokenCount]:
    """The tokens ``code`` fires on most (reverse search), most frequent first."""
    pos = cache.positions(codebook, code, head)
    if not len(pos):
        return []
    ids = np.asarray(cache.tokens)[pos]
    uniq, cnt = np.unique(ids, return_counts=True)
    order = np.lexsort((uniq, -cnt))[:top]
    freq = cache.token_frequencies
    return [
        TokenCount(
            token_id=int(uniq[i]),
            text=cache.token_str(int(uniq[i])),
            count=int(cnt[i]),
            share=float(cnt[i] / len(pos)),
            coverage=float(cnt[i] / max(1, int(freq[uniq[i]]))),
        )
        for i in order
    ]


def code_labels(
    cache: CodeCache, codebook: str, code: int, head: int | None = None
) -> list[LabelCount]:
    """How a code's firings spread over document labels (e.g. BBC topics), most first."""
    pos = cache.positions(codebook, code, head)
    docs = cache.docs
    labels = [d.label for d in docs]
    uniq = sorted({str(lab) for lab in labels})
    lab_idx = np.array([uniq.index(str(lab)) for lab in labels], dtype=np.int64)
    sizes = np.bincount(lab_idx, weights=[d.end - d.start for d in docs], minlength=len(uniq))
    fired = np.bincount(lab_idx[np.asarray(cache.doc_ids)[pos]], minlength=len(uniq))
    out = [
        LabelCount(
            label=None if uniq[j] == "None" else uniq[j],
            count=int(fired[j]),
            share=float(fired[j] / max(1, len(pos))),
            coverage=float(fired[j] / max(1.0, sizes[j])),
        )
        for j in range(len(uniq))
        if fired[j]
    ]
    return sorted(out, key=lambda x: -x.count)


# ------------------------------------------------------------------ contexts
@dataclass
class Context:
    """A token where a code fires, with text around it."""

    position: int
    doc: int
    """Row of the document in the cache."""
    doc_id: str
    label: str | None
    left: str
    token: str
    right: str
    rank: int
    """Slot of the code among the token's top-k (0 = best match)."""
    activation: float | None
    """SAE codebooks: the latent's activation on this token (else ``None``)."""

    def render(self, style: Literal["brackets", "ansi", "html"] = "brackets") -> str:
        """One line with the firing token highlighted."""
        left, right = _oneline(self.left), _oneline(self.right)
        tok = _oneline(self.token)
        if style == "html":
            return f"{html.escape(left)}<mark>{html.escape(tok)}</mark>{html.escape(right)}"
        if style == "ansi":
            return f"{left}\x1b[1;30;43m{tok}\x1b[0m{right}"
        return f"{left}[[{tok}]]{right}"


def _oneline(s: str) -> str:
    return s.replace("\r", " ").replace("\n", " ").replace("\t", " ")


def code_contexts(
    cache: CodeCache,
    codebook: str,
    code: int,
    head: int | None = None,
    *,
    n: int = 20,
    window: int = 60,
) -> list[Context]:
    """Up to ``n`` contexts where ``code`` fires.

    A codebook's cache keeps code ranks, not scores, so "top activating" means: firings where
    the code is the token's best match (rank 0) first, then rank 1, ...; within a rank,
    contexts are spread evenly over the cache instead of all coming from its first document.
    An SAE codebook keeps activations: its strongest firings come first, each with its value.
    """
    h = cache.check_code(codebook, code, head)
    pos = cache.positions(codebook, code, h)
    if not len(pos) or n <= 0:
        return []
    slots = np.asarray(cache.codes(codebook)[pos, h, :]) == code  # (m, k)
    rank = slots.argmax(axis=1)
    acts = _activations(cache, codebook, pos, rank)
    if acts is not None:  # strongest first (ties: earlier first)
        picked = [int(i) for i in np.argsort(-acts, kind="stable")[:n]]
    else:
        picked = _spread_by_rank(rank, n)
    docs = cache.docs
    out = []
    for i in picked:
        p = int(pos[i])
        d = int(cache.doc_ids[p])
        doc = docs[d]
        s, e = (int(x) for x in cache.offsets[p])
        out.append(
            Context(
                position=p,
                doc=d,
                doc_id=doc.id,
                label=doc.label,
                left=doc.text[max(0, s - window) : s],
                token=doc.text[s:e],
                right=doc.text[e : e + window],
                rank=int(rank[i]),
                activation=None if acts is None else float(acts[i]),
            )
        )
    return out


def _spread_by_rank(rank: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` rows, best rank first, spread evenly within a rank."""
    picked: list[int] = []
    for r in np.unique(rank):
        members = np.flatnonzero(rank == r)
        need = n - len(picked)
        if need <= 0:
            break
        if len(members) > need:
            members = members[np.linspace(0, len(members) - 1, need).round().astype(np.int64)]
        picked.extend(int(i) for i in members)
    return picked


def _activations(
    cache: CodeCache, codebook: str, pos: np.ndarray, slot: np.ndarray
) -> np.ndarray | None:
    """``(m,)`` float64 activations of an SAE latent at ``pos`` (in ``slot``), else ``None``."""
    if not cache.info(codebook).values:
        return None
    vals = np.asarray(cache.values(codebook)[pos], dtype=np.float64)  # (m, k)
    return vals[np.arange(len(pos)), slot]


@dataclass
class ActivationStats:
    """How strongly an SAE latent fires where it fires."""

    mean: float
    max: float
    min: float
    histogram: list[int]
    """Firings per bin of ``edges``."""
    edges: list[float]
    """``len(histogram) + 1`` bin edges, from ``min`` to ``max``."""


def latent_activations(
    cache: CodeCache, codebook: str, code: int, *, bins: int = 20
) -> ActivationStats | None:
    """Mean, extremes and a histogram of an SAE latent's activations (``None`` for codebooks
    and for latents that never fire)."""
    cache.check_code(codebook, code)
    pos = cache.positions(codebook, code)
    if not cache.info(codebook).values or not len(pos):
        return None
    slot = (np.asarray(cache.codes(codebook)[pos, 0, :]) == code).argmax(axis=1)
    acts = _activations(cache, codebook, pos, slot)
    assert acts is not None
    hist, edges = np.histogram(acts, bins=bins)
    return ActivationStats(
        mean=float(acts.mean()),
        max=float(acts.max()),
        min=float(acts.min()),
        histogram=[int(x) for x in hist],
        edges=[float(x) for x in edges],
    )


@dataclass
class TokenCodes:
    """One token of the cache and the codes that fire on it."""

    position: int
    text: str
    """The token's exact text in its document."""
    codes: dict[str, list[list[int]]]
    """``{codebook: [[codes of head 0], [head 1], ...]}`` (one inner list if ungrouped)."""


def token_codes(
    cache: CodeCache, start: int, end: int, codebooks: list[str] | None = None
) -> list[TokenCodes]:
    """Every token in positions ``[start, end)`` with its codes (for a text view)."""
    if not 0 <= start <= end <= cache.n_tokens:
        raise ValueError(
            f"token range [{start}, {end}) is invalid; it must lie in [0, {cache.n_tokens}]"
        )
    names = list(cache.codebooks) if codebooks is None else list(codebooks)
    rows = {n: fired_codes(cache, n, np.asarray(cache.codes(n)[start:end])) for n in names}
    return [
        TokenCodes(p, cache.token_text(p), {n: rows[n][p - start] for n in names})
        for p in range(start, end)
    ]


def fired_codes(cache: CodeCache, codebook: str, rows: np.ndarray) -> list[list[list[int]]]:
    """Stored codes ``(n, groups, k)`` as lists, without an SAE codebook's unfired slots."""
    unfired = cache.info(codebook).unfired
    out = rows.tolist()
    if unfired is None:
        return out  # type: ignore[no-any-return]
    return [[[c for c in head if c != unfired] for head in row] for row in out]


# ------------------------------------------------------------------- profile
@dataclass
class SimilarCode:
    code: int
    cosine: float


@dataclass
class CodeProfile:
    """Everything about one code: how often, where, on what, and what it writes."""

    codebook: str
    code: int
    head: int | None
    num_codes: int
    count: int
    """Tokens on which the code fires."""
    frequency: float
    """count / tokens in the cache."""
    usage_rank: int
    """1 = the most used code of its codebook (head)."""
    contexts: list[Context]
    tokens: list[TokenCount]
    labels: list[LabelCount]
    similar: list[SimilarCode]
    """Codes of the same codebook (head) with the most similar vectors (cosine)."""
    promoted: list[PromotedToken] | None = None
    """Output tokens the code promotes most (needs the model), else ``None``."""
    promoted_note: str = ""
    kind: str = "codebook"
    """The codebook's kind (``"codebook"``, ``"sparsify_topk"``, ...)."""
    activations: ActivationStats | None = None
    """SAE latents: their activations where they fire; ``None`` for codes."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similar_codes(
    cache: CodeCache, codebook: str, code: int, head: int | None = None, *, top: int = 10
) -> list[SimilarCode]:
    """Codes of the same codebook and head whose vectors are closest by cosine."""
    h = cache.check_code(codebook, code, head)
    vec = cache.vectors(codebook)
    if vec is None:
        return []
    v = np.asarray(vec[h], dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cos = v @ v[code]
    cos[code] = -np.inf
    order = np.argsort(-cos, kind="stable")[: min(top, len(cos) - 1)]
    return [SimilarCode(int(i), float(cos[i])) for i in order]


def code_profile(
    cache: CodeCache,
    codebook: str,
    code: int,
    head: int | None = None,
    *,
    model: Any = None,
    n_contexts: int = 20,
    window: int = 60,
    n_tokens: int = 20,
    n_similar: int = 10,
    n_promoted: int = 20,
) -> CodeProfile:
    """Frequency, contexts, tokens, labels, similar codes and (with ``model``) promoted tokens."""
    h = cache.check_code(codebook, code, head)
    cb = cache.info(codebook)
    counts = cache.code_counts(codebook)[h]
    count = int(counts[code])
    promoted, note = None, ""
    if model is not None:
        promoted, note = promoted_tokens(model, cache, codebook, code, h, top=n_promoted)
    return CodeProfile(
        codebook=codebook,
        code=int(code),
        head=h if cb.grouped else None,
        num_codes=cb.num_codes,
        count=count,
        frequency=count / max(1, cache.n_tokens),
        usage_rank=int((counts > count).sum()) + 1,
        contexts=code_contexts(cache, codebook, code, h, n=n_contexts, window=window),
        tokens=code_tokens(cache, codebook, code, h, top=n_tokens),
        labels=code_labels(cache, codebook, code, h),
        similar=similar_codes(cache, codebook, code, h, top=n_similar),
        promoted=promoted,
        promoted_note=note,
        kind=cb.kind,
        activations=latent_activations(cache, codebook, code) if cb.values else None,
    )
