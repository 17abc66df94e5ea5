"""``SearchConfig``: what the ``search`` command asks of a cache (its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from codebook_lens.codes.search.ranking import SortKey
from codebook_lens.flags import flag

QUERY = flag(exclusive="query", required=True)


@dataclass
class SearchConfig:
    """A pattern (one of ``regex``, ``token``, ``docs_label``) and how its codes are ranked."""

    regex: str | None = field(default=None, metadata=QUERY)
    """Regex over the text; a token matches if its span overlaps."""
    token: str | None = field(default=None, metadata=QUERY)
    """Token string (surrounding spaces ignored)."""
    docs_label: str | None = field(default=None, metadata=QUERY)
    """All tokens of documents with this label."""
    codebook: list[str] | None = field(default=None, metadata=flag(repeat=True))
    """Only this codebook (repeatable; None: all)."""
    min_count: int = 1
    """Minimum firings of a code."""
    min_precision: float = 0.0
    """Minimum precision of a code."""
    min_recall: float = 0.0
    """Minimum recall of a code."""
    top: int = 20
    """Results to show."""
    sort_by: SortKey = "f1"
    """What the codes are ranked by."""
    timeout: float | None = None
    """Seconds a regex may run (None: DEFAULT_REGEX_TIMEOUT, 2 s, per million tokens of the
    cache, at least that)."""
    model: str | None = None
    """Model folder; with --neuron-baseline."""
    neuron_baseline: bool = field(default=False, metadata=flag(switch=True))
    """Also find the best single neuron at the best code's site (needs --model)."""
    neuron_tokens: int = 50_000
    """Tokens used for the neuron baseline."""
    workers: int | None = None
    """Processes to search in (None: the cores, for a large query)."""
