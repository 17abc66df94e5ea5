"""Who sees which documents: the LM's split, the classifier's train and test splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.training.data import Document, load_documents, split_documents


def interleave(docs: Sequence[Document]) -> list[Document]:
    """Documents round-robin over labels, so any prefix (a cache cut at ``max_tokens``)
    covers every topic evenly."""
    by: dict[str | None, list[Document]] = {}
    for d in docs:
        by.setdefault(d.label, []).append(d)
    queues = [list(v) for _, v in sorted(by.items(), key=lambda kv: str(kv[0]))]
    out: list[Document] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


@dataclass
class Splits:
    """Who sees which documents: the LM, the classifier, the classifier's test."""

    lm: list[Document]
    classifier_train: list[Document]
    classifier_test: list[Document]


def split_corpus(cfg: TopicsConfig) -> Splits:
    """``cfg.data`` split (seeded by ``cfg.seed``) into the LM's documents and the
    classifier's train and test documents; every document needs a topic label."""
    docs = load_documents(cfg.data, limit=cfg.doc_limit)
    unlabelled = [d.id for d in docs if d.label is None]
    if unlabelled:
        raise ValueError(
            f"data={cfg.data!r}: documents need topic labels (e.g. one sub-folder per topic); "
            f"{len(unlabelled)} have none, e.g. {unlabelled[:3]}"
        )
    lm, held = split_documents(docs, cfg.heldout_fraction, seed=cfg.seed)
    clf_train, clf_test = split_documents(held, cfg.classifier_test_fraction, seed=cfg.seed + 1)
    return Splits(lm, clf_train, clf_test)
