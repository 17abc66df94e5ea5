"""Code cache: on-disk format, inverted index, atomic writes, model runs, identity checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from helpers.synthetic import synthetic_cache

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.codes.cache import (
    CacheWriter,
    CodebookInfo,
    CodeCache,
    build_cache,
    check_identity,
    code_dtype,
    index as cache_mod,
)

TEXTS = [
    "In May the rain falls. It may rain in May, or in June.",
    "Sport: the team won the match in May after a late goal.",
    "The minister spoke in June about taxes and the market.",
    "Shares fell in March; the market recovered by May.",
]


@dataclass
class Doc:
    id: str
    text: str
    label: str | None


def docs(n_repeat: int = 3) -> list[Doc]:
    labels = ["weather", "sport", "politics", "business"]
    return [Doc(f"d{r}-{i}", t, labels[i]) for r in range(n_repeat) for i, t in enumerate(TEXTS)]


def small_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE fast tokenizer trained offline on TEXTS (~300 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def small_model(vocab: int, seed: int = 0, k: int = 2):  # type: ignore[no-untyped-def]
    cfg = CodebookConfig(num_codes=16, k=k, placements=["attn_heads", "mlp_out"], seed=seed)
    return attach_codebooks(tiny_model("gpt2", vocab=vocab), cfg)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return small_tokenizer()


# ------------------------------------------------------------------ format
def test_code_dtype_is_smallest_that_fits() -> None:
    assert code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16
    assert code_dtype(65_536) == np.uint16
    assert code_dtype(65_537) == np.uint32


def _write(path: Path, codes: np.ndarray, num_codes: int, grouped: bool) -> CodeCache:
    groups = codes.shape[1] if grouped else 1
    info = CodebookInfo("layers.0.x", "mlp_out", 0, groups, grouped, codes.shape[-1], num_codes, 8)
    with CacheWriter(path, codebooks=[info], identity={}, vocab=["a", "b"]) as w:
        w.add_document("d0", "ab" * len(codes), None)
        offs = np.stack([np.arange(len(codes)), np.arange(len(codes)) + 1], 1)
        w.add_tokens(np.zeros(len(codes), np.int32), offs, {"layers.0.x": codes})
        return w.finish()


@pytest.mark.parametrize("num_codes,dtype", [(200, np.uint8), (1000, np.uint16)])
def test_codes_stored_memory_mapped_in_small_dtype(
    tmp_path: Path, num_codes: int, dtype: type
) -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, num_codes, size=(50, 3))
    cache = _write(tmp_path / "c", codes, num_codes, grouped=False)
    stored = np.load(tmp_path / "c" / "codes" / "layers.0.x.npy", allow_pickle=False)
    assert stored.dtype == dtype and stored.shape == (50, 3)
    assert np.array_equal(stored, codes)
    assert isinstance(cache.codes("layers.0.x"), np.memmap)
    assert cache.codes("layers.0.x").shape == (50, 1, 3)
    assert cache.manifest["n_tokens"] == 50


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_inverted_index_matches_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(cache_mod, "_INDEX_CHUNK", chunk)  # small chunks: the two-pass path
    rng = np.random.default_rng(1)
    n, g, k, c = 97, 3, 2, 11
    codes = np.stack([rng.permutation(c)[:k] for _ in range(n * g)]).reshape(n, g, k)
    cache = _write(tmp_path / "c", codes, c, grouped=True)
    for h in range(g):
        for code in range(c):
            want = np.flatnonzero((codes[:, h, :] == code).any(axis=1))
            assert np.array_equal(cache.positions("layers.0.x", code, h), want)
    counts = cache.code_counts("layers.0.x")
    assert counts.shape == (g, c) and counts.sum() == n * g * k


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    info = CodebookInfo("cb", "mlp_out", 0, 1, False, 1, 4, 8)
    with (
        pytest.raises(RuntimeError, match="boom"),
        CacheWriter(tmp_path / "c", codebooks=[info], identity={}, vocab=[]) as w,
    ):
        w.add_document("d", "x", None)
        w.add_tokens(np.zeros(1, np.int32), np.array([[0, 1]]), {"cb": np.zeros((1, 1))})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    synthetic_cache(tmp_path / "c", n_tokens=50)
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        synthetic_cache(tmp_path / "c", n_tokens=50)
    c = synthetic_cache(tmp_path / "c", n_tokens=60, overwrite=True)
    assert c.n_tokens == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_codes_out_of_range_rejected(tmp_path: Path) -> None:
    info = CodebookInfo("cb", "mlp_out", 0, 1, False, 1, 4, 8)
    with (
        pytest.raises(ValueError, match=r"ids outside \[0, 3\]"),
        CacheWriter(tmp_path / "c", codebooks=[info], identity={}, vocab=[]) as w,
    ):
        w.add_document("d", "x", None)
        w.add_tokens(np.zeros(1, np.int32), np.array([[0, 1]]), {"cb": np.full((1, 1), 4)})


def test_not_a_cache_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such cache folder"):
        CodeCache(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a codebook-lens cache"):
        CodeCache(tmp_path / "x")


def test_synthetic_cache_offsets_select_words(tmp_path: Path) -> None:
    c = synthetic_cache(tmp_path / "c", n_tokens=500, doc_tokens=100, plant={"May": 7})
    assert (c.n_tokens, c.n_docs) == (500, 5)
    for p in range(0, 500, 37):
        assert c.token_text(p) == c.token_str(int(c.tokens[p])).strip()
    may = np.flatnonzero([c.token_str(int(t)).strip() == "May" for t in c.tokens])
    assert np.array_equal(c.positions("layers.0.mlp_out", 7), may)


# ----------------------------------------------------------------- a model
def test_build_cache_codes_equal_model_codes(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    model = small_model(len(tok))
    cache = build_cache(
        model,
        tok,
        docs(),
        tmp_path / "c",
        max_tokens=10_000,
        seq_len=8,
        batch_size=3,
        progress=False,
    )
    n_expected = sum(len(tok(d.text)["input_ids"]) for d in docs())
    assert cache.n_tokens == n_expected and cache.n_docs == 12
    assert cache.info("layers.0.attn_heads").groups == 4
    assert cache.codes("layers.1.attn_heads").dtype == np.uint8
    windows = list(cache.windows())
    assert all(e - s <= 8 for s, e in windows) and windows[-1][1] == cache.n_tokens
    for s, e in windows:  # same codes as running each window alone
        ids = torch.tensor(np.asarray(cache.tokens[s:e]), dtype=torch.long)[None]
        want = model.get_codes(ids)
        for name in model.codebooks:
            got = cache.codes(name)[s:e]
            assert np.array_equal(want[name][0].numpy().reshape(got.shape), got), (name, s)
    # offsets point at the token's text, documents keep their labels
    d = cache.docs[1]
    assert d.label == "sport" and d.text == TEXTS[1]
    joined = "".join(cache.token_text(p) for p in range(d.start, d.end))
    assert joined == TEXTS[1]
    # each module's train/eval mode is restored (the base stays in eval mode: no dropout)
    assert model.training and not any(m.training for m in model.base.modules())


def test_build_cache_token_limit_and_identity(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    model = small_model(len(tok))
    cache = build_cache(model, tok, docs(), tmp_path / "c", max_tokens=30, progress=False)
    assert cache.n_tokens == 30
    assert cache.docs[-1].end == 30
    check_identity(cache, model)  # same model: fine
    other = small_model(len(tok), seed=1)  # same architecture, other code vectors
    with pytest.raises(ValueError, match="built with a different model.*codebook_hash"):
        check_identity(cache, other)
    other_k = small_model(len(tok), k=3)
    with pytest.raises(ValueError, match="config_hash"):
        check_identity(cache, other_k)


def test_build_cache_needs_fast_tokenizer(tmp_path: Path) -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        build_cache(small_model(64), Slow(), docs(), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_identity_covers_the_affine_layer_norm(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from codebook_lens.codes.cache import model_identity

    def model(affine: bool):  # type: ignore[no-untyped-def]
        cfg = CodebookConfig(
            num_codes=16, k=2, placements=["mlp_out"], seed=0, layer_norm=True,
            layer_norm_affine=affine,
        )  # fmt: skip
        return attach_codebooks(tiny_model("gpt2", vocab=len(tok)), cfg)

    plain, affine = model(False), model(True)
    # Without the option the identity is what it was before the option existed (old caches
    # still open): the same fields and code vectors, hashed the same way.
    full = plain.config.to_dict()
    old_fields = ("num_codes", "k", "similarity", "reduction", "layer_norm", "placements",
                  "layers", "modules")  # fmt: skip
    old_cfg = json.dumps({f: full.get(f) for f in old_fields}, sort_keys=True)
    h = hashlib.sha256()
    for name, layer in plain.codebooks.items():
        h.update(name.encode())
        h.update(layer.codebook.detach().float().numpy().tobytes())
    got = model_identity(plain)
    assert got["config_hash"] == hashlib.sha256(old_cfg.encode()).hexdigest()[:16]
    assert got["codebook_hash"] == h.hexdigest()[:16]
    # Same code vectors (same seed), affine LayerNorm on: a different config and codebooks.
    for name in plain.codebooks:
        assert torch.equal(plain.codebooks[name].codebook, affine.codebooks[name].codebook)
    ident = model_identity(affine)
    assert ident["config_hash"] != got["config_hash"]
    assert ident["codebook_hash"] != got["codebook_hash"]
    cache = build_cache(affine, tok, docs(1), tmp_path / "c", max_tokens=20, progress=False)
    check_identity(cache, affine)
    with pytest.raises(ValueError, match="config_hash"):
        check_identity(cache, plain)
    # Two affine models that differ only in a LayerNorm weight (or bias) differ too.
    other = model(True)
    with torch.no_grad():
        next(iter(other.codebooks.values())).ln_weight[0, 0] += 0.5  # type: ignore[index]
    with pytest.raises(ValueError, match="codebook_hash"):
        check_identity(cache, other)
    other = model(True)
    with torch.no_grad():
        next(iter(other.codebooks.values())).ln_bias[0, 0] += 0.5  # type: ignore[index]
    assert model_identity(other)["codebook_hash"] != ident["codebook_hash"]
