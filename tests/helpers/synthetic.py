"""Synthetic code caches: random English-like words and random codes, written with
``CacheWriter`` (the library's public writer), for tests and benchmarks.

Importable as ``helpers.synthetic``: pytest puts ``tests/`` on ``sys.path`` (the folder of the
root ``conftest.py``); a benchmark script puts it there itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from codebook_lens.codes.cache import (
    CacheWriter,
    CodebookInfo,
    CodeCache,
    code_dtype,
    merge_shards,
    select_index,
    shard_name,
)

WORDS = (  # noqa: SIM905 (one readable string)
    "the of and to in a is that for it as was with be by on not he I this are or his from at "
    "which but have an they you were her she there one all we their has been would when who "
    "will more no if out so said what up its about into than them can only other new some "
    "could time these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take "
    "three January February March April May June July August September October November "
    "December team goal match market shares profit phone software film music election"
).split()


def synthetic_cache(
    out: str | os.PathLike[str],
    *,
    n_tokens: int = 10_000,
    n_codebooks: int = 2,
    num_codes: int = 64,
    k: int = 2,
    groups: int = 1,
    doc_tokens: int = 200,
    plant: dict[str, int] | None = None,
    labels: tuple[str, ...] = ("business", "sport", "tech"),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    index: str | Sequence[str] | bool = "all",
    shards: int = 1,
) -> CodeCache:
    """A cache of random English-like words and random codes, for tests and benchmarks.

    Codes are distinct within each token (and head). ``plant={"May": 7}`` makes code 7 of the
    first codebook (head 0) fire exactly on the word "May" and nowhere else (the other heads of
    that codebook never use planted ids). Codebooks are named
    ``layers.{i}.mlp_out`` (``layers.{i}.attn_heads`` with ``groups`` heads if ``groups > 1``).
    Token ``i`` is word ``i`` at a document start, token ``len(words) + i`` is " word".
    ``index`` as in ``build_cache``; ``shards > 1`` writes the same data as that many shards
    (contiguous runs of documents) of one cache.
    """
    if k > num_codes - 1:
        raise ValueError(f"k={k} is invalid; it must be < num_codes={num_codes}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards={shards!r} is invalid; it must be an integer >= 1")
    rng = np.random.default_rng(seed)
    vocab = WORDS + [" " + w for w in WORDS]
    names = [c.name for c in _codebooks(n_codebooks, groups, k, num_codes, index)]
    vectors = {
        name: rng.standard_normal((groups, num_codes, 16)).astype(np.float32) for name in names
    }
    planted = _planted_codes(plant, num_codes)
    root = Path(out)
    if shards > 1 and (root / "manifest.json").is_file() and overwrite:
        (root / "manifest.json").unlink()

    def writer(i: int) -> CacheWriter:
        return CacheWriter(
            root / shard_name(i, shards) if shards > 1 else root,
            codebooks=_codebooks(n_codebooks, groups, k, num_codes, index),
            identity=_identity(seed, len(vocab), names),
            vocab=vocab,
            tokenizer="words",
            seq_len=doc_tokens,
            vectors=vectors,
            overwrite=overwrite,
            extra={"source": "synthetic"},
            shard=(i, shards) if shards > 1 else None,
        )

    documents = _documents(rng, n_tokens, doc_tokens, names, groups, k, num_codes, planted)
    bar = tqdm(total=n_tokens, unit="tok", desc="synthetic", disable=not progress)
    done, current = 0, 0
    w = writer(0)
    try:
        for d, (text, tokens, offsets, codes) in enumerate(documents):
            if shards > 1 and done * shards // n_tokens > current:  # the next shard starts
                w.finish(progress=progress)
                current = done * shards // n_tokens
                w = writer(current)
            w.add_document(f"doc{d}", text, labels[d % len(labels)] if labels else None)
            w.add_tokens(tokens, offsets, codes)
            done += len(tokens)
            bar.update(len(tokens))
        bar.close()
        cache = w.finish(progress=progress)
    except BaseException:
        w.abort()
        raise
    return merge_shards(root) if shards > 1 else cache


def _documents(
    rng: np.random.Generator,
    n_tokens: int,
    doc_tokens: int,
    names: list[str],
    groups: int,
    k: int,
    num_codes: int,
    planted: dict[int, int],
) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """``(text, tokens, offsets, {codebook: codes})`` of documents of ``doc_tokens`` tokens
    (the last one shorter) until ``n_tokens``; the planted codes are in the first codebook."""
    zipf = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.9
    probs = zipf / zipf.sum()
    done = 0
    while done < n_tokens:
        n = min(doc_tokens, n_tokens - done)
        word_ids, text, tokens, offsets = _document(rng, probs, n)
        codes = {
            name: _codes(rng, word_ids, groups, k, num_codes, planted if ci == 0 else {})
            for ci, name in enumerate(names)
        }
        yield text, tokens, offsets, codes
        done += n


def _identity(seed: int, vocab_size: int, names: list[str]) -> dict[str, Any]:
    """A made-up model identity (what ``model_identity`` gives for a real model)."""
    return {
        "base_model": "synthetic",
        "model_type": "synthetic",
        "vocab_size": vocab_size,
        "config_hash": f"seed{seed}",
        "codebook_hash": f"seed{seed}",
        "codebooks": names,
    }


def _codebooks(
    n_codebooks: int, groups: int, k: int, num_codes: int, index: str | Sequence[str] | bool
) -> list[CodebookInfo]:
    """Fresh descriptions of the codebooks (a writer fills in their file names)."""
    placement = "attn_heads" if groups > 1 else "mlp_out"
    made = [
        CodebookInfo(
            name=f"layers.{i}.{placement}",
            placement=placement,
            layer=i,
            groups=groups,
            grouped=groups > 1,
            k=k,
            num_codes=num_codes,
            dim=16 * groups,
        )
        for i in range(n_codebooks)
    ]
    indexed = set(select_index(index, [c.name for c in made]))
    for c in made:
        c.indexed = c.name in indexed
    return made


def _planted_codes(plant: dict[str, int] | None, num_codes: int) -> dict[int, int]:
    """``{word id: code}`` from ``{word: code}``."""
    planted: dict[int, int] = {}
    for word, code in (plant or {}).items():
        if word not in WORDS or not 0 <= code < num_codes:
            raise ValueError(
                f"plant={plant!r} is invalid; use words of the built-in list and codes in "
                f"0 .. {num_codes - 1}"
            )
        planted[WORDS.index(word)] = code
    return planted


def _document(
    rng: np.random.Generator, probs: np.ndarray, n: int
) -> tuple[np.ndarray, str, np.ndarray, np.ndarray]:
    """``(word ids, text, token ids (n,), character offsets (n, 2))`` of a random document."""
    word_ids = rng.choice(len(WORDS), size=n, p=probs)
    pieces = [WORDS[i] if j == 0 else " " + WORDS[i] for j, i in enumerate(word_ids)]
    lens = np.array([len(piece) for piece in pieces])
    ends = np.cumsum(lens)
    offsets = np.stack([ends - lens, ends], axis=1)
    offsets[1:, 0] += 1  # a token's leading space is not part of its word
    tokens = np.where(np.arange(n) == 0, word_ids, word_ids + len(WORDS))
    return word_ids, "".join(pieces), tokens, offsets


def _codes(
    rng: np.random.Generator,
    word_ids: np.ndarray,
    groups: int,
    k: int,
    num_codes: int,
    planted: dict[int, int],
) -> np.ndarray:
    """Random codes ``(n, [groups,] k)``, distinct per token and head; each planted code fires
    on its word (head 0) and nowhere else."""
    n = len(word_ids)
    reserved = sorted(set(planted.values()))
    free = num_codes - len(reserved)
    # Distinct codes per token: a random start plus k-1 positive steps < free.
    start = rng.integers(0, free, size=(n, groups, 1))
    steps = rng.integers(1, max(2, free // k + 1), size=(n, groups, k - 1))
    cc = np.concatenate([start, start + np.cumsum(steps, axis=2)], axis=2) % free
    if reserved:
        head0 = cc[:, 0]  # a view: edits land in cc
        for r in reserved:  # shift ids up past each reserved (planted) code
            head0[head0 >= r] += 1
        for wi, code in planted.items():
            rows = np.flatnonzero(word_ids == wi)
            head0[rows, rng.integers(0, k, size=len(rows))] = code
    arr = cc if groups > 1 else cc[:, 0]
    return arr.astype(code_dtype(num_codes))
