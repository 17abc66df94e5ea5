"""The judge of the topic experiment: a naive Bayes topic classifier over words."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codebook_lens.config import write_json_atomic

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (the classifier's features)."""
    return _WORD.findall(text.lower())


class TopicClassifier:
    """Multinomial naive Bayes over word counts, with a uniform prior over topics.

    The prior is uniform on purpose: a generation with no topical words should not be pulled
    towards the topic with the most training articles, so the unsteered on-topic rates are not
    inflated for large topics.
    """

    def __init__(self, labels: list[str], vocab: list[str], log_probs: np.ndarray) -> None:
        if log_probs.shape != (len(labels), len(vocab)):
            raise ValueError(
                f"log_probs has shape {log_probs.shape}; expected ({len(labels)}, {len(vocab)})"
            )
        self.labels = labels
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.log_probs = log_probs
        """``(labels, vocab)`` log P(word | label)."""

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        alpha: float = 0.5,
        min_count: int = 2,
    ) -> TopicClassifier:
        """Train on ``texts`` with their ``labels``; words seen fewer than ``min_count`` times
        in total are dropped. ``alpha`` is the additive (Laplace/Lidstone) smoothing."""
        if len(texts) != len(labels) or not texts:
            raise ValueError(
                f"texts ({len(texts)}) and labels ({len(labels)}) must be non-empty and equally long"
            )
        if alpha <= 0:
            raise ValueError(f"alpha={alpha!r} is invalid; it must be > 0")
        names = sorted(set(labels))
        if len(names) < 2:
            raise ValueError(f"labels={names} is invalid; the classifier needs >= 2 topics")
        docs = [Counter(words(t)) for t in texts]
        total: Counter[str] = Counter()
        for d in docs:
            total.update(d)
        vocab = sorted(w for w, c in total.items() if c >= min_count)
        index = {w: i for i, w in enumerate(vocab)}
        counts = np.zeros((len(names), len(vocab)), dtype=np.float64)
        row = {n: i for i, n in enumerate(names)}
        for d, label in zip(docs, labels, strict=True):
            r = row[label]
            for w, c in d.items():
                j = index.get(w)
                if j is not None:
                    counts[r, j] += c
        counts += alpha
        log_probs = np.log(counts / counts.sum(1, keepdims=True))
        return cls(names, vocab, log_probs)

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)), dtype=np.float64)
        for i, t in enumerate(texts):
            for w in words(t):
                j = self.index.get(w)
                if j is not None:
                    x[i, j] += 1
        return x

    def log_posterior(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, labels)`` normalised log P(label | text) (uniform prior)."""
        scores = self._features(texts) @ self.log_probs.T
        return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str | None]:
        """Most likely topic of each text; ``None`` for a text with no known word (judged
        off every topic rather than given an arbitrary label)."""
        known = self._features(texts).sum(1) > 0
        best = self.log_posterior(texts).argmax(1)
        return [self.labels[i] if k else None for i, k in zip(best, known, strict=True)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        if not texts:
            raise ValueError("accuracy of an empty set is undefined; give at least one text")
        pred = self.predict(texts)
        return float(np.mean([p == y for p, y in zip(pred, labels, strict=True)]))

    def top_words(self, label: str, n: int = 10) -> list[str]:
        """Words most indicative of ``label`` (largest log-probability ratio to the others)."""
        r = self.labels.index(label)
        others = np.logaddexp.reduce(np.delete(self.log_probs, r, axis=0), axis=0) - math.log(
            len(self.labels) - 1
        )
        ratio = self.log_probs[r] - others
        return [self.vocab[j] for j in np.argsort(-ratio)[:n]]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``classifier.json`` (labels, vocab) and ``classifier_log_probs.npy``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".classifier_log_probs.npy.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.save(f, self.log_probs, allow_pickle=False)
            os.replace(tmp, out / "classifier_log_probs.npy")
        finally:
            tmp.unlink(missing_ok=True)
        write_json_atomic(
            out / "classifier.json",
            {"kind": "multinomial_naive_bayes", "labels": self.labels, "vocab": self.vocab},
        )
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TopicClassifier:
        d = Path(directory)
        try:
            meta = json.loads((d / "classifier.json").read_text(encoding="utf-8"))
            log_probs = np.load(d / "classifier_log_probs.npy", allow_pickle=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{d}: no saved topic classifier ({e.filename})") from None
        return cls(list(meta["labels"]), list(meta["vocab"]), log_probs)
