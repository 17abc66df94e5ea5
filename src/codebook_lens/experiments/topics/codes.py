"""Topic codes: where codes fire (precision and document coverage in a topic's documents),
what they do when forced (``code_effects``), and the per-head cap on forced codes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.intervene import EditSpec, InterventionSpec, intervene
from codebook_lens.codes.search import docs_pattern, search
from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.experiments.topics.model import TopicModels
from codebook_lens.experiments.topics.sampling import steering_contexts
from codebook_lens.model.codebook_model import CodebookModel


@dataclass
class TopicCode:
    """A code that marks one topic."""

    codebook: str
    head: int | None
    code: int
    precision: float
    """Fraction of the code's firings inside the topic's documents."""
    coverage: float
    """Fraction of the topic's documents in which the code fires at least once."""
    count: int
    """Tokens on which the code fires (whole cache)."""
    effect: float | None = None
    """Forced alone: change of the next token's expected topic log-likelihood ratio (nats;
    ``code_effects``), ``None`` until measured."""
    cost: float | None = None
    """Forced alone: change of the next-token cross-entropy against the base model (nats)."""

    @property
    def score(self) -> float:
        return self.precision * self.coverage


def find_topic_codes(
    cache: CodeCache,
    topic: str,
    *,
    n: int | None,
    max_per_head: int,
    min_precision: float,
    min_count: int,
    codebooks: list[str] | None = None,
) -> list[TopicCode]:
    """Codes that fire throughout ``topic``'s documents and rarely elsewhere.

    Candidates come from ``search.search`` over the topic's documents (precision >=
    ``min_precision``, firing >= ``min_count`` times); each is scored by precision x document
    coverage, and the best ``n`` (``None`` = all) are kept with at most ``max_per_head`` per
    head.
    """
    pattern = docs_pattern(cache, topic)
    found = search(
        cache,
        pattern,
        codebooks=codebooks,
        min_count=min_count,
        min_precision=min_precision,
        top=None,
        sort_by="precision",
    )
    docs = cache.docs
    topic_docs = np.array([d.label == topic for d in docs])
    n_topic = max(int(topic_docs.sum()), 1)
    doc_ids = np.asarray(cache.doc_ids)
    scored = []
    for m in found.matches:
        fired = np.unique(doc_ids[cache.positions(m.codebook, m.code, m.head)])
        coverage = float(topic_docs[fired].sum()) / n_topic
        scored.append(TopicCode(m.codebook, m.head, m.code, m.precision, coverage, m.count))
    scored.sort(key=lambda c: (-c.score, -c.count, c.codebook, c.head or 0, c.code))
    return cap_per_head(scored, n, max_per_head)


def cap_per_head(ranked: Sequence[TopicCode], n: int | None, max_per_head: int) -> list[TopicCode]:
    """The first ``n`` (``None`` = all) of ``ranked`` with at most ``max_per_head`` per head."""
    chosen: list[TopicCode] = []
    per_head: Counter[tuple[str, int | None]] = Counter()
    for c in ranked:
        if n is not None and len(chosen) >= n:
            break
        if per_head[(c.codebook, c.head)] < max_per_head:
            chosen.append(c)
            per_head[(c.codebook, c.head)] += 1
    return chosen


def token_topic_llr(
    cache: CodeCache,
    topics: Sequence[str],
    *,
    alpha: float = 0.5,
    count: Literal["tokens", "documents"] = "tokens",
) -> np.ndarray:
    """``(topics, vocab)`` topic evidence of each token, from the cache's documents (the LM's
    own text, not the judge's articles).

    ``count='tokens'``: log P(token | topic) - log P(token | the other topics) over token
    counts. ``count='documents'``: log P(a topic document contains the token) - log P(another
    document does); a name repeated through a few articles then carries little evidence, a
    word used across the topic's articles carries much. ``alpha``: additive smoothing.
    """
    tokens = np.asarray(cache.tokens).astype(np.int64)
    doc_ids = np.asarray(cache.doc_ids).astype(np.int64)
    doc_labels = np.array([str(d.label) for d in cache.docs])
    vocab = len(cache.vocab)
    out = np.zeros((len(topics), vocab))
    if count == "documents":
        pairs = np.unique(doc_ids * vocab + tokens)  # each (document, token) once
        d, t = pairs // vocab, pairs % vocab
        df = np.stack([np.bincount(t[doc_labels[d] == x], minlength=vocab) for x in topics]).astype(
            np.float64
        )
        nd = np.array([(doc_labels == x).sum() for x in topics], dtype=np.float64)
        for i in range(len(topics)):
            rest, n_rest = np.delete(df, i, axis=0).sum(0), np.delete(nd, i).sum()
            out[i] = np.log((df[i] + alpha) / (nd[i] + 2 * alpha)) - np.log(
                (rest + alpha) / (n_rest + 2 * alpha)
            )
        return out
    labels = doc_labels[doc_ids]
    counts = np.stack(
        [np.bincount(tokens[labels == t], minlength=vocab).astype(np.float64) for t in topics]
    )
    counts += alpha
    for i in range(len(topics)):
        rest = np.delete(counts, i, axis=0).sum(0)
        out[i] = np.log(counts[i] / counts[i].sum()) - np.log(rest / rest.sum())
    return out


def code_effects(
    model: CodebookModel,
    base: nn.Module | None,
    codes: Sequence[TopicCode],
    contexts: torch.Tensor,
    llr: np.ndarray,
    *,
    slot: str,
    scale: float,
    progress: bool = False,
) -> list[TopicCode]:
    """Force each code alone at every position of ``contexts`` ``(n, length)`` and measure, at
    every position, the change of E[``llr``(next token)] (``effect``, nats) and of the
    next-token cross-entropy against the base model (``cost``, nats; the codebook model with
    codebooks off when ``base`` is None). Returns copies of ``codes`` with both set.

    Where a code fires says what it *detects*; this says what it *does* when forced, which is
    what steering needs (a code that fires throughout a topic's documents may only mark, say,
    proper names there, and forcing it writes name fragments, not the topic's words).
    """
    device = next(model.parameters()).device
    x = contexts.to(device)
    w = torch.as_tensor(llr, dtype=torch.float32, device=device)
    plen = x.shape[1]
    with torch.no_grad():
        if base is not None:
            ref = F.log_softmax(base(input_ids=x).logits.float(), -1)
        else:
            with model.disabled():
                ref = F.log_softmax(model(input_ids=x).logits.float(), -1)

        def measure(spec: InterventionSpec | None) -> tuple[float, float]:
            with intervene(model, spec, prompt_length=plen, length=plen):
                p = F.softmax(model(input_ids=x).logits.float(), -1)
            return float((p @ w).mean()), float(-(p * ref).sum(-1).mean())

        e0, c0 = measure(None)
        out = []
        for c in tqdm(codes, desc="code effects", disable=not progress):
            edit = EditSpec(
                c.codebook, [c.code], positions="all", action="force", slot=slot, scale=scale,  # type: ignore[arg-type]
                head=c.head,
            )  # fmt: skip
            e, cost = measure(InterventionSpec([edit]))
            out.append(replace(c, effect=e - e0, cost=cost - c0))
    return out


def rank_by_effect(
    model: CodebookModel,
    tokenizer: Any,
    base: nn.Module | None,
    cache: CodeCache,
    candidates: Mapping[str, Sequence[TopicCode]],
    cfg: TopicsConfig,
) -> dict[str, list[TopicCode]]:
    """Each topic's candidates with ``effect``/``cost`` measured on contexts sampled from the
    tuning prompts, best effect first; codes that do not raise the topic's words are dropped."""
    topics = list(candidates)
    llr = token_topic_llr(cache, topics, count=cfg.effect_evidence)
    ctx = steering_contexts(
        model,
        tokenizer,
        cfg.tune_prompts,
        per_prompt=cfg.effect_contexts,
        length=cfg.effect_length,
        seed=cfg.seed,
    )
    out = {}
    for i, t in enumerate(topics):
        measured = code_effects(
            model,
            base,
            candidates[t],
            ctx,
            llr[i],
            slot=cfg.slot,
            scale=cfg.scale,
            progress=cfg.progress,
        )
        kept = [c for c in measured if (c.effect or 0.0) > 0.0]
        kept.sort(key=lambda c: (-(c.effect or 0.0), c.codebook, c.head or 0, c.code))
        out[t] = kept
    return out


def topic_code_pools(
    cfg: TopicsConfig, models: TopicModels, cache: CodeCache, topics: Sequence[str]
) -> dict[str, dict[str, list[TopicCode]]]:
    """Ranking ('firing' and/or 'effect', as ``cfg.selection`` says) -> topic -> its candidate
    codes best first, at most ``cfg.max_codes_per_head`` per head; only the attention-head
    codebooks of ``models.model`` are searched."""
    model = models.model
    heads = [
        n for n, s in zip(model.codebooks, model.sites, strict=True) if s.placement == "attn_heads"
    ]
    if not heads:
        raise ValueError(
            f"model={models.source}: has no attention-head codebooks (placement 'attn_heads'); "
            f"its codebooks are {list(model.codebooks)}"
        )
    # Candidates: every code that fires mostly in the topic's documents, ranked by where it
    # fires; 'effect' re-ranks them by what they do when forced (on the tuning prompts).
    ranked = {
        t: find_topic_codes(
            cache,
            t,
            n=None,
            max_per_head=10**9,
            min_precision=cfg.min_precision,
            min_count=cfg.min_count,
            codebooks=heads,
        )
        for t in topics
    }
    rankings = {"firing": ranked}
    if cfg.selection in ("effect", "both"):
        rankings["effect"] = rank_by_effect(
            model, models.tokenizer, models.base, cache, ranked, cfg
        )
    if cfg.selection == "effect":
        del rankings["firing"]
    return {
        r: {t: cap_per_head(rk[t], None, cfg.max_codes_per_head) for t in topics}
        for r, rk in rankings.items()
    }
