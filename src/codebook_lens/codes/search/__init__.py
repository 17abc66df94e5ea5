"""Query a code cache: which codes fire on a pattern, and what a code fires on.

- ``patterns``: token positions from a regex, a token string or a set of documents;
- ``ranking``: every code's hits, precision, recall and F1 for a pattern (``search``);
- ``profiles``: one code's tokens, labels, contexts, similar codes (``code_profile``);
- ``output``: text tables, terminal text and HTML pages;
- ``config``: ``SearchConfig``, the ``search`` command's options.

Large queries use the machine (``workers=``): see ``codes.pool``.
"""

from codebook_lens.codes.direct_effect import PromotedToken
from codebook_lens.codes.pool import available_cores
from codebook_lens.codes.search.config import SearchConfig
from codebook_lens.codes.search.output import (
    format_matches,
    format_profile,
    format_table,
    profile_html,
    save_html,
)
from codebook_lens.codes.search.patterns import (
    DEFAULT_REGEX_TIMEOUT,
    PARALLEL_MIN_TEXT_BYTES,
    Pattern,
    PatternKind,
    docs_pattern,
    make_pattern,
    regex_pattern,
    regex_timeout,
    token_pattern,
)
from codebook_lens.codes.search.profiles import (
    ActivationStats,
    CodeProfile,
    Context,
    LabelCount,
    SimilarCode,
    TokenCodes,
    TokenCount,
    code_contexts,
    code_labels,
    code_profile,
    code_tokens,
    fired_codes,
    latent_activations,
    similar_codes,
    token_codes,
)
from codebook_lens.codes.search.ranking import (
    PARALLEL_MIN_ENTRIES,
    SORT_KEYS,
    CodeMatch,
    SearchResult,
    SortKey,
    all_code_hits,
    code_hits,
    search,
    search_loop,
    search_pattern,
)

__all__ = [
    "DEFAULT_REGEX_TIMEOUT",
    "PARALLEL_MIN_ENTRIES",
    "PARALLEL_MIN_TEXT_BYTES",
    "SORT_KEYS",
    "SearchConfig",
    "ActivationStats",
    "CodeMatch",
    "CodeProfile",
    "Context",
    "LabelCount",
    "Pattern",
    "PatternKind",
    "PromotedToken",
    "SearchResult",
    "SimilarCode",
    "SortKey",
    "TokenCodes",
    "TokenCount",
    "all_code_hits",
    "available_cores",
    "code_contexts",
    "code_hits",
    "code_labels",
    "code_profile",
    "code_tokens",
    "docs_pattern",
    "format_matches",
    "format_profile",
    "fired_codes",
    "format_table",
    "latent_activations",
    "make_pattern",
    "profile_html",
    "regex_pattern",
    "regex_timeout",
    "save_html",
    "search",
    "search_loop",
    "search_pattern",
    "similar_codes",
    "token_codes",
    "token_pattern",
]
