"""``ConceptsConfig``: every setting of the concept battery experiment."""

from __future__ import annotations

from dataclasses import dataclass

from codebook_lens.config import check_range


@dataclass
class ConceptsConfig:
    """The concept battery (``codebook-lens experiment concepts``)."""

    out: str = "runs/concepts"
    """Output folder: report.md, report.html, metrics.json, plots (and the model when trained)."""

    topics_run: str | None = None
    """A finished `experiment topics` folder: its model/, base/ and cache/ are reused."""

    model: str | None = None
    """A saved codebook model (with tokenizer); overrides topics_run's model."""

    cache: str | None = None
    """A code cache of that model; None = topics_run's cache, or one built into OUT/cache."""

    base: str | None = None
    """The base model (no codebooks) for the k-means control; None = topics_run's base/, else
    the codebook model with its codebooks switched off."""

    concepts: str | None = None
    """The concept battery, a YAML file (None = the built-in battery of 40+ concepts)."""

    data: str = "bbc"
    """Corpus for training (when nothing is reused) or for a new cache."""

    max_tokens: int = 200_000
    """Evaluate on the cache's first this many tokens (code, neuron and control alike)."""

    min_tokens: int = 10
    """Skip concepts occurring on fewer evaluated tokens than this."""

    min_precision: float = 0.9
    """Precision of a 'precise' code (the feature criterion)."""

    min_recall: float = 0.3
    """Recall a precise code needs to count for the target."""

    min_count: int = 5
    """A precise code must fire on at least this many tokens."""

    kmeans_tokens: int = 100_000
    """Tokens the k-means control is fitted on (random, seeded)."""

    kmeans_iters: int = 20
    """Lloyd iterations of the k-means control."""

    contexts: int = 6
    """Contexts shown per concept."""

    regex_timeout: float = 10.0
    """Seconds each concept regex may run over the cache."""

    quick: bool = False
    """A toy model and few tokens: end to end in seconds (tests, smoke runs)."""

    seed: int = 0
    """Seed of training (when nothing is reused) and of the k-means control."""

    device: str = "cpu"
    """'cpu' or 'cuda'."""

    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "min_tokens", "min_count", "kmeans_tokens", "contexts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid; it must be an integer >= 1")
        if isinstance(self.kmeans_iters, bool) or not isinstance(self.kmeans_iters, int):
            raise ValueError(
                f"kmeans_iters={self.kmeans_iters!r} is invalid; it must be an integer"
            )
        check_range("kmeans_iters", self.kmeans_iters, 0)
        check_range("min_precision", self.min_precision, 0.0, 1.0, low_open=True)
        check_range("min_recall", self.min_recall, 0.0, 1.0)
        check_range("regex_timeout", self.regex_timeout, 0.0, low_open=True)
        if self.cache is not None and self.model is None and self.topics_run is None:
            raise ValueError(
                f"cache={self.cache!r} needs the model it was built with: give model= (--model)"
            )
        if self.quick:
            self.max_tokens = min(self.max_tokens, 6_000)
            self.kmeans_tokens = min(self.kmeans_tokens, 6_000)
            self.kmeans_iters = min(self.kmeans_iters, 5)
            self.min_tokens = min(self.min_tokens, 3)
