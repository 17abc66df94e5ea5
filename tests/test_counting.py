"""The counting kernel under ``search`` against a plain per-entry loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.synthetic import synthetic_cache

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.search import all_code_hits, code_hits, counting
from codebook_lens.codes.search.counting import count_codes


def reference_counts(codes: np.ndarray, positions: np.ndarray, num_codes: int) -> np.ndarray:
    """One increment per stored id below ``num_codes``, position by position."""
    out = np.zeros((codes.shape[1], num_codes), dtype=np.int64)
    for t in positions:
        for g in range(codes.shape[1]):
            for c in codes[t, g]:
                if c < num_codes:
                    out[g, c] += 1
    return out


@pytest.mark.parametrize(
    ("n", "groups", "k", "num_codes", "dtype"),
    [
        (300, 1, 1, 7, np.uint8),
        (300, 4, 3, 255, np.uint8),  # the unfired id 255 is the dtype's largest
        (400, 16, 8, 1_000, np.uint16),
        (200, 3, 2, 40_000, np.uint16),  # ids past int16: the plain path
        (200, 2, 4, 70_000, np.uint32),
    ],
)
def test_count_codes_equals_reference(
    n: int, groups: int, k: int, num_codes: int, dtype: type, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(counting, "SMALL_ENTRIES", 0)  # the kernel even on small inputs
    rng = np.random.default_rng(n + groups + k)
    codes = rng.integers(0, num_codes + 1, (n, groups, k)).astype(dtype)  # num_codes = unfired
    np.save(tmp_path / "codes.npy", codes)
    mapped = np.load(tmp_path / "codes.npy", mmap_mode="r")
    runs = np.concatenate([np.arange(10, 60), np.arange(100, 101), np.arange(150, 199)])
    for positions in (
        np.arange(n),
        np.sort(rng.choice(n, n // 3, replace=False)),
        rng.integers(0, n, 90),  # any order, repeats counted again
        runs,
        np.zeros(0, dtype=np.int64),
    ):
        want = reference_counts(codes, positions, num_codes)
        assert np.array_equal(count_codes(mapped, positions, num_codes), want)
        assert np.array_equal(count_codes(codes, positions, num_codes), want)
        strided = np.asarray(codes)[:, :, ::-1]  # not C-contiguous: the plain path
        assert np.array_equal(count_codes(strided, positions, num_codes), want)


def test_count_codes_in_small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of a few rows (buffers reused, a short last step) count the same."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 51, (500, 5, 3)).astype(np.uint16)
    positions = rng.integers(0, 500, 333)
    want = reference_counts(codes, positions, 50)
    monkeypatch.setattr(counting, "ROWS_ENTRIES", 7 * 5 * 3)
    monkeypatch.setattr(counting, "SMALL_ENTRIES", 0)
    assert np.array_equal(count_codes(codes, positions, 50), want)


def test_count_codes_keeps_the_thread_count() -> None:
    threads = torch.get_num_threads()
    codes = np.zeros((10, 2, 2), dtype=np.uint16)
    count_codes(codes, np.arange(10), 4)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("shards", "groups", "k"), [(1, 4, 8), (3, 16, 2), (2, 1, 1)])
def test_code_hits_on_shards_equal_reference(
    tmp_path: Path, shards: int, groups: int, k: int
) -> None:
    # Default thresholds: shard pieces small enough for the plain path and large ones both.
    cache = synthetic_cache(
        tmp_path / "c", n_tokens=12_000, n_codebooks=2, num_codes=300, k=k, groups=groups,
        shards=shards, index="none",
    )  # fmt: skip
    assert len(CodeCache(tmp_path / "c").parts) == shards
    rng = np.random.default_rng(shards)
    positions = np.sort(rng.choice(cache.n_tokens, cache.n_tokens // 3, replace=False))
    hits = all_code_hits(cache, list(cache.codebooks), positions, workers=1)
    split = all_code_hits(cache, list(cache.codebooks), positions, workers=2)
    for name in cache.codebooks:
        codes = np.asarray(cache.codes(name))
        want = reference_counts(codes, positions, cache.info(name).num_codes)
        assert np.array_equal(code_hits(cache, name, positions), want)
        assert np.array_equal(hits[name], want)
        assert np.array_equal(split[name], want)
