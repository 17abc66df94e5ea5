"""The cache's format: its folder layout, the manifest, what a codebook and a document are.

A cache is a folder; every array is a ``.npy`` file read with ``np.load(mmap_mode="r",
allow_pickle=False)``, so opening a cache costs nothing and a query only touches the rows it
needs::

    manifest.json                  format, version, model identity, codebooks, counts, and
                                   every file's shape, dtype, size and BLAKE2b checksum
    tokens.npy                     (n_tokens,) int32 token ids
    doc_ids.npy                    (n_tokens,) int32 row of the token's document in docs.jsonl
    offsets.npy                    (n_tokens, 2) int32 character start/end in the document text
    docs.jsonl                     one {"id", "label", "start", "end", "text"} per document;
                                   start/end is its token range
    docs.index.npy                 (n_docs + 1,) int64 byte offset of each line of docs.jsonl
    vocab.json                     decoded string of every token id
    codes/<name>.npy               (n_tokens, [groups,] k) code ids, smallest unsigned dtype
    counts/<name>.npy              (groups, num_codes) int64 tokens on which each code fires
    index/<name>.indptr.npy        (groups * num_codes + 1,) int64  } inverted index (CSR):
    index/<name>.positions.npy     (n_tokens * groups * k,) int32   } key = group * C + code
    vectors/<name>.npy             (groups, num_codes, head_dim) float32 code vectors
    values/<name>.npy              (n_tokens, k) float32 latent activations (SAE codebooks)

``index`` answers "where does code X fire" in O(hits): the sorted token positions of key
``g * C + c`` are ``positions[indptr[key]:indptr[key + 1]]``. The index is optional per
codebook (it is twice the size of the codes); without it, positions come from a scan of the
codes, and search (which needs only the codes and the counts) is as fast as with it.

**SAE codebooks** (``kind`` other than ``"codebook"``) hold a sparse autoencoder's latents: each
token's ``k`` strongest latents, strongest first, in ``codes/`` and their activations in
``values/``. A slot where fewer than ``k`` latents fired holds the id ``num_codes`` (one past the
last latent; value 0): counts, the index and search never count it. ``site`` says where the SAE
reads and ``source`` where it was loaded from, so the app can load it again.

Documents are split into windows of ``seq_len`` tokens from the document start, each run
without earlier context; the same windows are used whenever activations are recomputed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from codebook_lens.config import read_json

CACHE_FORMAT = "codebook-lens-cache"
CACHE_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 caches (no checksums, counts or optional index) are still read."""
_PARTIAL = ".partial"  # suffix of the hidden folder an unfinished build writes


class DocumentLike(Protocol):
    """What the cache needs from a document (``data.Document`` fits)."""

    id: str
    text: str
    label: str | None


@dataclass
class CodebookInfo:
    """One codebook stored in a cache."""

    name: str
    """Codebook name, e.g. ``layers.0.attn_heads``."""
    placement: str
    """'attn_heads', 'attn_out', 'mlp_out', 'residual' or 'module'."""
    layer: int | None
    """Block index (``None`` for module globs)."""
    groups: int
    """Heads (1 for ungrouped codebooks)."""
    grouped: bool
    """Whether the stored codes have a head axis: ``(n, groups, k)`` vs ``(n, k)``."""
    k: int
    """Codes per token (per head)."""
    num_codes: int
    """Codes per codebook (C)."""
    dim: int
    """Activation width at the site (all heads together)."""
    file: str = ""
    """File stem under ``codes/``, ``counts/``, ``index/`` and ``vectors/``."""
    indexed: bool = True
    """Whether the inverted index (``index/``) was built for this codebook."""
    kind: str = "codebook"
    """``"codebook"``, or the SAE's kind: ``"sparsify_topk"``, ``"saelens_batchtopk"``, ..."""
    site: dict[str, Any] | None = None
    """SAE codebooks: where the SAE reads: ``{"name", "module", "hook"}`` (its own site name,
    the Hugging Face module path, 'input' or 'output' of that module)."""
    source: str = ""
    """SAE codebooks: the folder the SAE was loaded from (absolute)."""
    values: str = ""
    """dtype of ``values/<file>.npy`` (the latents' activations); ``""`` for codebooks."""

    @property
    def is_sae(self) -> bool:
        """Whether this codebook holds an SAE's latents (with activations and unfired slots)."""
        return self.kind != "codebook"

    @property
    def unfired(self) -> int | None:
        """The id stored in a slot where no latent fired (SAE codebooks), else ``None``."""
        return self.num_codes if self.is_sae else None

    @property
    def dtype(self) -> np.dtype[Any]:
        return code_dtype(self.num_codes + 1 if self.is_sae else self.num_codes)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one token's codes as stored: ``(groups, k)`` or ``(k,)``."""
        return (self.groups, self.k) if self.grouped else (self.k,)


@dataclass
class Doc:
    """A document in a cache: its text and its token range ``[start, end)``."""

    id: str
    label: str | None
    text: str
    start: int
    end: int


def code_dtype(num_codes: int) -> np.dtype[Any]:
    """Smallest unsigned integer type that holds ids ``0 .. num_codes - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def file_stem(name: str, taken: set[str]) -> str:
    """A file name for codebook ``name`` that no other codebook in ``taken`` has (added to it)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "codebook"
    base, i = stem, 1
    while stem in taken:
        stem, i = f"{base}_{i}", i + 1
    taken.add(stem)
    return stem


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where an unfinished build of ``out`` lives (hidden, next to it)."""
    out = Path(out)
    return out.parent / f".{out.name}{_PARTIAL}"


def read_manifest(p: Path) -> dict[str, Any]:
    """The manifest in file ``p``; ``ValueError`` unless it is a cache's, of a readable version."""
    manifest = read_json(p)
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{p}: not a codebook-lens cache (field 'format' should be {CACHE_FORMAT!r})"
        )
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{p}: version {manifest.get('version')!r} is not supported (this codebook-lens "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild the cache"
        )
    return manifest
