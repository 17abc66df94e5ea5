"""Concept batteries: named patterns (regexes, tokens, token sets, document labels) read from
YAML, and where each occurs in a code cache."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.search import docs_pattern, regex_pattern, token_pattern

ConceptKind = Literal["regex", "token", "tokens", "docs"]
CONCEPT_KINDS: tuple[str, ...] = ("regex", "token", "tokens", "docs")


@dataclass
class Concept:
    """One named pattern of a battery."""

    name: str
    kind: ConceptKind
    """'regex', 'token', 'tokens' (a set of token strings) or 'docs' (a document label)."""
    query: str | list[str]
    description: str = ""

    def query_text(self) -> str:
        return ", ".join(self.query) if isinstance(self.query, list) else self.query


def builtin_battery_path() -> Path:
    """The battery shipped with the package (``experiments/data/concepts.yaml``)."""
    return Path(str(resources.files("codebook_lens.experiments") / "data" / "concepts.yaml"))


def load_battery(path: str | Path | None = None) -> list[Concept]:
    """Read a concept battery (``None`` = the built-in one); errors name the file and entry."""
    src = builtin_battery_path() if path is None else Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"concepts={str(src)!r}: no such battery file (a YAML file)")
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"concepts={str(src)!r}: not valid YAML ({err})") from None
    entries = data.get("concepts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"concepts={str(src)!r}: expected a non-empty list under 'concepts:' "
            "(each entry: name plus one of regex, token, tokens, docs)"
        )
    out: list[Concept] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"concepts={str(src)!r}, entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a mapping with 'name' and a pattern, got {e!r}")
        name = e.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"concepts={str(src)!r}, concept {name!r}"
        if name in seen:
            raise ValueError(f"{where}: the name is used twice; names must be unique")
        seen.add(name)
        unknown = sorted(set(e) - {"name", "description", *CONCEPT_KINDS})
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; allowed: name, description, regex, token, "
                "tokens, docs"
            )
        kinds = [k for k in CONCEPT_KINDS if k in e]
        if len(kinds) != 1:
            raise ValueError(
                f"{where}: give exactly one of regex, token, tokens, docs (got {kinds or 'none'})"
            )
        kind = kinds[0]
        q = e[kind]
        if kind == "tokens":
            if not isinstance(q, list) or not q or not all(isinstance(t, str) and t for t in q):
                raise ValueError(f"{where}: 'tokens' must be a non-empty list of strings")
            query: str | list[str] = [str(t) for t in q]
        else:
            if isinstance(q, int | float) and not isinstance(q, bool) and kind != "regex":
                q = str(q)  # YAML reads `token: 2004` as a number
            if not isinstance(q, str) or not q:
                raise ValueError(f"{where}: {kind!r} must be a non-empty string, got {q!r}")
            query = q
        desc = e.get("description", "")
        out.append(Concept(name, kind, query, str(desc or "")))  # type: ignore[arg-type]
    return out


def concept_positions(cache: CodeCache, concept: Concept, *, timeout: float = 10.0) -> np.ndarray:
    """Sorted token positions of ``concept`` in ``cache`` (empty if it never occurs there).

    ``ValueError`` for an invalid regex (or one that times out); a document label absent from
    the cache gives no positions (the concept is then skipped, not an error).
    """
    if concept.kind == "regex":
        assert isinstance(concept.query, str)
        try:
            return regex_pattern(cache, concept.query, timeout=timeout).positions
        except ValueError as e:
            raise ValueError(f"concept {concept.name!r}: {e}") from None
    if concept.kind == "token":
        assert isinstance(concept.query, str)
        return token_pattern(cache, concept.query).positions
    if concept.kind == "tokens":
        parts = [token_pattern(cache, t).positions for t in concept.query]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    assert isinstance(concept.query, str)
    if concept.query not in {d.label for d in cache.docs}:
        return np.zeros(0, dtype=np.int64)
    return docs_pattern(cache, concept.query).positions
