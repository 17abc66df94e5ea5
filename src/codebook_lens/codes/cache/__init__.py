"""Code cache: run a codebook model over text once, keep every token's codes on disk.

A cache is a folder of memory-mapped ``.npy`` arrays and a ``manifest.json`` (the layout is in
``format``). The package's modules, each with one job:

- ``format``: the layout, the manifest, ``CodebookInfo`` and ``Doc``, code dtypes;
- ``identity``: a model's identity, and the check that a cache was built with the model;
- ``files``: ``.npy`` headers, checksums, every file checked against the manifest;
- ``index``: the inverted index code -> token positions;
- ``shards``: shard names and resolution, the manifest of a sharded cache, ``ShardedArray``;
- ``reader``: ``CodeCache``, ``load_cache``, ``verify_cache``;
- ``writer``: ``CacheWriter`` (streamed, checkpointed, resumable), ``merge_shards``;
- ``build``: ``build_cache``, a model and documents -> a cache.

**Writing** happens in a hidden ``.<name>.partial`` folder next to the cache that is renamed
into place at the end, so a cache folder is either complete or absent. A build records a
checkpoint after every chunk of tokens; ``resume=True`` continues from the last one, giving
the same bytes as a build that was never interrupted. Codes computed some other way are
written with ``CacheWriter`` directly.

**Shards**: several processes (``torchrun`` ranks, or machines with ``shard=(i, n)``) each
write ``<cache>/shard-0000i-of-0000n/``, a complete cache of a contiguous slice of the
documents. ``<cache>/manifest.json`` then lists the shards (it is written by whichever shard
finishes last, or derived on opening), and ``CodeCache(<cache>)`` reads them as one cache:
positions and documents in one global order, the concatenation of the shards.
"""

from codebook_lens.codes.cache.build import (
    DEFAULT_CHUNK_TOKENS,
    CacheConfig,
    build_cache,
    interleave_labels,
    select_codebooks,
    select_index,
)
from codebook_lens.codes.cache.files import Problem, check_files, file_digest, npy_info
from codebook_lens.codes.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    READABLE_VERSIONS,
    CodebookInfo,
    Doc,
    DocumentLike,
    code_dtype,
    partial_path,
)
from codebook_lens.codes.cache.identity import check_identity, model_identity
from codebook_lens.codes.cache.index import build_index, count_codes
from codebook_lens.codes.cache.reader import CodeCache, load_cache, verify_cache
from codebook_lens.codes.cache.shards import (
    ShardedArray,
    check_shard,
    resolve_shard,
    shard_from_env,
    shard_name,
)
from codebook_lens.codes.cache.writer import CacheWriter, merge_shards

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DEFAULT_CHUNK_TOKENS",
    "CacheConfig",
    "READABLE_VERSIONS",
    "CacheWriter",
    "CodeCache",
    "CodebookInfo",
    "Doc",
    "DocumentLike",
    "Problem",
    "ShardedArray",
    "build_cache",
    "build_index",
    "check_files",
    "check_identity",
    "check_shard",
    "code_dtype",
    "count_codes",
    "file_digest",
    "interleave_labels",
    "load_cache",
    "merge_shards",
    "model_identity",
    "npy_info",
    "partial_path",
    "resolve_shard",
    "select_codebooks",
    "select_index",
    "shard_from_env",
    "shard_name",
    "verify_cache",
]
