"""Version-proof access to the KV cache of Hugging Face models.

transformers 5.24 renamed the cache keyword and output field from ``past_key_values`` to
``cache`` (the old name warns and goes away in 5.40). Code here never names one keyword: it asks
the model's ``forward`` signature which one it takes, and recognises a cache by what it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

CACHE_NAMES = ("cache", "past_key_values")
"""Keyword names that transformers versions have used for the KV cache, newest first."""


def cache_keyword(model: Any) -> str:
    """The KV-cache keyword that ``model``'s forward (or its wrapped base's) accepts."""
    target = model
    # A CodebookModel forwards everything to .base; look at the real signature.
    while not _declares_cache(target) and isinstance(getattr(target, "base", None), nn.Module):
        target = target.base
    try:
        params = inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):
        return CACHE_NAMES[-1]
    for name in CACHE_NAMES:
        if name in params:
            return name
    return CACHE_NAMES[-1]


def _declares_cache(model: Any) -> bool:
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False
    return any(n in params for n in CACHE_NAMES)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{<the model's cache keyword>: cache, "use_cache": True}`` for a forward call."""
    return {cache_keyword(model): cache, "use_cache": True}


def output_cache(out: Any) -> Any:
    """The KV cache a forward call returned (``out.cache`` or ``out.past_key_values``)."""
    for name in CACHE_NAMES:
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def is_cache(value: Any) -> bool:
    """Whether ``value`` looks like a KV cache (a ``Cache`` object or legacy key/value tuples)."""
    if hasattr(value, "get_seq_length"):
        return True
    return (
        isinstance(value, tuple | list)
        and len(value) > 0
        and isinstance(value[0], tuple | list)
        and len(value[0]) > 0
        and isinstance(value[0][0], Tensor)
    )


def cache_length(cache: Any) -> int:
    """Tokens already held in a KV cache (0 for ``None`` or an empty cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if is_cache(cache):
        return int(cache[0][0].shape[-2])  # legacy ((key, value), ...) tuples
    return 0


def find_cache_length(args: Iterable[Any], kwargs: dict[str, Any]) -> int:
    """Tokens already processed, read from whatever cache a forward call was given.

    The cache is found by what it is, under any keyword (or positionally), so a renamed
    keyword cannot silently turn every generation step into "a fresh sequence".
    """
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return cache_length(kwargs[name])
    for value in (*kwargs.values(), *args):
        if is_cache(value):
            return cache_length(value)
    return 0
