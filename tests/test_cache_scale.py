"""Caches at scale: verifiable files, chosen codebooks, optional indices, resumable builds,
shards read as one cache, and parallel search equal to the serial one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.synthetic import synthetic_cache
from test_cache import TEXTS, Doc, docs, small_model, small_tokenizer

from codebook_lens.cli import main
from codebook_lens.codes import cache as cache_mod
from codebook_lens.codes.cache import (
    CacheWriter,
    CodeCache,
    ShardedArray,
    build_cache,
    merge_shards,
    partial_path,
    resolve_shard,
    shard_name,
    verify_cache,
)
from codebook_lens.codes.search import (
    all_code_hits,
    code_contexts,
    code_profile,
    make_pattern,
    search,
    search_pattern,
)

EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: builds compared byte for byte share the time stamp


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok):  # type: ignore[no-untyped-def]
    return small_model(len(tok))


def corpus(n_repeat: int = 6) -> list[Doc]:
    return docs(n_repeat)


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def same_cache(a: CodeCache, b: CodeCache) -> None:
    """Two caches hold the same tokens, documents and codes, position for position."""
    assert (a.n_tokens, a.n_docs) == (b.n_tokens, b.n_docs)
    for name in ("tokens", "doc_ids", "offsets"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name
    assert [(d.id, d.start, d.end, d.text) for d in a.docs] == [
        (d.id, d.start, d.end, d.text) for d in b.docs
    ]
    assert list(a.codebooks) == list(b.codebooks)
    for cb in a.codebooks:
        assert np.array_equal(np.asarray(a.codes(cb)), np.asarray(b.codes(cb))), cb
        assert np.array_equal(a.code_counts(cb), b.code_counts(cb)), cb


# ------------------------------------------------------------- verifiable
def test_manifest_records_every_file_and_verify_is_clean(tmp_path: Path) -> None:
    c = synthetic_cache(tmp_path / "c", n_tokens=600, n_codebooks=2, groups=2, num_codes=32)
    files = c.manifest["files"]
    on_disk = {p.relative_to(c.path).as_posix() for p in c.path.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(files) == on_disk
    codes = files["codes/layers.0.attn_heads.npy"]
    assert codes["shape"] == [600, 2, 2] and codes["dtype"] == "uint8"
    assert codes["bytes"] == (c.path / "codes/layers.0.attn_heads.npy").stat().st_size
    assert len(codes["blake2b"]) == 64
    # appended .npy files are byte for byte what np.save writes
    stored = np.load(c.path / "codes/layers.0.attn_heads.npy")
    np.save(tmp_path / "ref.npy", stored)
    assert (tmp_path / "ref.npy").read_bytes() == (
        c.path / "codes/layers.0.attn_heads.npy"
    ).read_bytes()
    assert verify_cache(c.path) == []
    assert np.array_equal(
        c.code_counts("layers.1.attn_heads"),
        np.diff(c.index("layers.1.attn_heads")[0]).reshape(2, 32),
    )


def test_verify_names_every_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = synthetic_cache(tmp_path / "c", n_tokens=600, n_codebooks=2)
    assert main(["verify", str(c.path)]) == 0
    assert "ok" in capsys.readouterr().out
    flipped = c.path / "codes/layers.1.mlp_out.npy"
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0xFF  # same size, same header: only the checksum can tell
    flipped.write_bytes(bytes(raw))
    docs_file = c.path / "docs.jsonl"
    docs_file.write_bytes(docs_file.read_bytes().replace(b"doc1", b"doc9", 1))
    truncated = c.path / "index/layers.0.mlp_out.positions.npy"
    truncated.write_bytes(truncated.read_bytes()[:-8])
    (c.path / "counts/layers.1.mlp_out.npy").unlink()
    problems = {p.file: p.what for p in verify_cache(c.path)}
    assert set(problems) == {
        "codes/layers.1.mlp_out.npy",
        "docs.jsonl",
        "index/layers.0.mlp_out.positions.npy",
        "counts/layers.1.mlp_out.npy",
    }
    assert "checksum mismatch" in problems["codes/layers.1.mlp_out.npy"]
    assert "checksum mismatch" in problems["docs.jsonl"]
    assert "truncated" in problems["index/layers.0.mlp_out.positions.npy"]
    assert "missing" in problems["counts/layers.1.mlp_out.npy"]
    # the quick mode sees sizes and headers only, not the flipped bytes
    quick = {p.file for p in verify_cache(c.path, checksums=False)}
    assert quick == {"index/layers.0.mlp_out.positions.npy", "counts/layers.1.mlp_out.npy"}
    assert main(["verify", str(c.path)]) == 2
    out, err = capsys.readouterr()
    assert "4 bad file(s)" in err and "codes/layers.1.mlp_out.npy" in err
    assert out.count("\n") == 4  # one line per problem
    # opening runs the cheap check: truncation and a missing file are refused at once
    with pytest.raises(ValueError, match=r"positions.npy: \d+ bytes, expected \d+ .*truncated"):
        CodeCache(c.path)


def test_edited_manifest_is_caught_on_opening(tmp_path: Path) -> None:
    """The issue's case: a manifest that disagrees with its arrays."""
    c = synthetic_cache(tmp_path / "c", n_tokens=6000, n_codebooks=1, groups=2, k=4, num_codes=32)
    m = json.loads((c.path / "manifest.json").read_text())
    m["n_tokens"] = 1_000_000_000
    (c.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as err:
        CodeCache(c.path)
    msg = str(err.value)
    assert "codes/layers.0.attn_heads.npy: expected shape (1000000000, 2, 4) uint8" in msg
    assert "found (6000, 2, 4) uint8" in msg and "tokens.npy" in msg
    assert "codebook-lens verify" in msg
    with pytest.raises(ValueError, match="expected shape"):
        from codebook_lens.app import AppConfig, create_app

        create_app(AppConfig(str(c.path)))


def test_version_1_cache_still_opens(tmp_path: Path) -> None:
    c = synthetic_cache(tmp_path / "c", n_tokens=500, plant={"May": 7})
    want = search_pattern(c, regex=r"\bMay\b", top=None).to_dict()
    m = json.loads((c.path / "manifest.json").read_text())
    for key in ("files", "kind", "omitted", "shard", "build"):
        m.pop(key)
    m["version"] = 1
    for cb in m["codebooks"]:
        cb.pop("indexed")
    (c.path / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(c.path / "counts")
    (c.path / "docs.index.npy").unlink()
    old = CodeCache(c.path)
    assert search_pattern(old, regex=r"\bMay\b", top=None).to_dict() == want
    assert verify_cache(c.path) == []  # shapes checked; no checksums recorded to compare


# ------------------------------------------------------ what is stored
def test_codebook_globs_and_index_choice(tmp_path: Path, tok, model) -> None:  # type: ignore[no-untyped-def]
    full = build_cache(model, tok, corpus(), tmp_path / "full", seq_len=16, progress=False)
    part = build_cache(
        model,
        tok,
        corpus(),
        tmp_path / "part",
        seq_len=16,
        codebooks=["layers.1.*"],
        index=["*.mlp_out"],
        progress=False,
    )
    assert list(part.codebooks) == ["layers.1.attn_heads", "layers.1.mlp_out"]
    assert part.omitted == ["layers.0.attn_heads", "layers.0.mlp_out"]
    assert [cb.indexed for cb in part.codebooks.values()] == [False, True]
    assert not list((part.path / "index").glob("layers.1.attn_heads*"))
    assert any("2 of the model's 4 codebooks are not in this cache" in n for n in part.notes())
    assert any("1 of 2 codebooks have no inverted index" in n for n in part.notes())
    for name in part.codebooks:
        assert np.array_equal(np.asarray(part.codes(name)), np.asarray(full.codes(name)))
        assert np.array_equal(part.code_counts(name), full.code_counts(name))
    # without an index, positions (and so contexts) come from a scan: the same answers
    for code in range(16):
        for head in range(4):
            assert np.array_equal(
                part.positions("layers.1.attn_heads", code, head),
                full.positions("layers.1.attn_heads", code, head),
            )
    assert code_contexts(part, "layers.1.attn_heads", 3, 1) == code_contexts(
        full, "layers.1.attn_heads", 3, 1
    )
    pat = make_pattern(part, regex=r"\bMay\b")
    got = search(part, pat, top=None).matches
    want = [m for m in search(full, pat, top=None).matches if m.codebook.startswith("layers.1.")]
    assert got == want
    with pytest.raises(
        ValueError, match=r"'layers.0.mlp_out' was not stored .*--codebooks layers.1.\*"
    ):
        search(part, pat, codebooks=["layers.0.mlp_out"])
    with pytest.raises(ValueError, match="has no inverted index"):
        part.index("layers.1.attn_heads")
    with pytest.raises(
        ValueError, match=r"the glob 'layers.7.\*' matches no codebook; the model has"
    ):
        build_cache(model, tok, corpus(), tmp_path / "x", codebooks=["layers.7.*"], progress=False)
    assert not (tmp_path / "x").exists() and not partial_path(tmp_path / "x").exists()


def test_cli_cache_codebooks_index_none_and_search_notes(
    tmp_path: Path,
    tok,
    model,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    data = tmp_path / "data"
    data.mkdir()
    for i, t in enumerate(TEXTS):
        (data / f"{i}.txt").write_text(t)
    out = tmp_path / "c"
    argv = ["cache", str(tmp_path / "m"), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--codebooks", "layers.0.*", "--index", "none"]) == 0
    c = CodeCache(out)
    assert list(c.codebooks) == ["layers.0.attn_heads", "layers.0.mlp_out"]
    assert not any(cb.indexed for cb in c.codebooks.values())
    assert not list((out / "index").iterdir())
    capsys.readouterr()
    assert main(["search", str(out), "--regex", "May"]) == 0
    text = capsys.readouterr().out
    assert "note: 2 of the model's 4 codebooks are not in this cache" in text
    assert main(["search", str(out), "--regex", "May", "--codebook", "layers.1.mlp_out"]) == 2
    assert "was not stored in this cache" in capsys.readouterr().err
    assert main(["search", str(out), "--regex", "May", "--json"]) == 0
    got = capsys.readouterr()
    json.loads(got.out)  # the JSON stays clean; the notes go to stderr
    assert "note: 2 of the model's 4 codebooks are not in this cache" in got.err
    assert "2 of 2 codebooks have no inverted index" in got.err
    # serve says the same before it starts the app
    import codebook_lens.app as app_mod

    started = []
    monkeypatch.setattr(app_mod, "serve", lambda config: started.append(config.cache_dir))
    assert main(["serve", str(out), "--port", "0"]) == 0
    assert started == [str(out)]
    text = capsys.readouterr().out
    assert "note: 2 of the model's 4 codebooks are not in this cache" in text


# --------------------------------------------------------------- resume
def test_interrupted_build_resumes_to_the_same_bytes(
    tmp_path: Path,
    tok,
    model,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    kw = {"seq_len": 8, "batch_size": 2, "chunk_tokens": 20, "progress": False}
    ref = build_cache(model, tok, corpus(), tmp_path / "ref", **kw)  # type: ignore[arg-type]
    out = tmp_path / "c"
    real_add = CacheWriter.add_tokens
    for stop_after in (7, 23, 41):  # interrupted three times, each further along
        calls = {"n": 0}

        def flaky(self, *a, _stop=stop_after, _calls=calls):  # type: ignore[no-untyped-def]
            _calls["n"] += 1
            if _calls["n"] > _stop:
                raise KeyboardInterrupt
            return real_add(self, *a)

        monkeypatch.setattr(CacheWriter, "add_tokens", flaky)
        with pytest.raises(KeyboardInterrupt):
            build_cache(model, tok, corpus(), out, resume=True, **kw)  # type: ignore[arg-type]
        assert not out.exists() and (partial_path(out) / "state.json").is_file()
    monkeypatch.setattr(CacheWriter, "add_tokens", real_add)
    with pytest.raises(ValueError, match=r"an interrupted build of .* pass resume=True"):
        build_cache(model, tok, corpus(), out, **kw)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="the interrupted build used seq_len=8, this one seq_len=16"
    ):
        build_cache(model, tok, corpus(), out, resume=True, **{**kw, "seq_len": 16})  # type: ignore[arg-type]
    got = build_cache(model, tok, corpus(), out, resume=True, **kw)  # type: ignore[arg-type]
    assert files_of(got.path) == files_of(ref.path)
    assert not partial_path(out).exists()
    # resuming a finished build is a no-op
    again = build_cache(model, tok, corpus(), out, resume=True, **kw)  # type: ignore[arg-type]
    assert files_of(again.path) == files_of(ref.path)


def test_bad_input_leaves_no_partial(tmp_path: Path, tok, model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="gave no tokens"):
        build_cache(model, tok, [Doc("e", "", None)], tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # several interpreter start-ups: ~30-60 s on 2 busy cores
def test_sigkill_during_cache_build_then_resume_gives_the_same_bytes(
    tmp_path: Path,
    tok,
    model,  # type: ignore[no-untyped-def]
) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    data = tmp_path / "data"
    for i, d in enumerate(corpus(30)):
        (data / str(d.label)).mkdir(parents=True, exist_ok=True)
        (data / str(d.label) / f"{i:03d}.txt").write_text(d.text)
    args = ["--data", str(data), "--tokens", "100000", "--seq-len", "8", "--batch-size", "2"]
    args += ["--chunk-tokens", "40"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(root / "src"),
        "SOURCE_DATE_EPOCH": EPOCH,
        "CODEBOOK_LENS_CACHE_BATCH_DELAY": "0.01",
    }
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as the subprocesses: the same floats
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        assert main(["cache", str(tmp_path / "m"), *args, "--out", str(ref)]) == 0
    finally:
        torch.set_num_threads(threads)
        if old is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old
    out = tmp_path / "c"
    state = partial_path(out) / "state.json"
    rng = random.Random(0)

    def rows() -> int:
        try:
            return int(json.loads(state.read_text())["rows"])
        except (OSError, ValueError, KeyError):
            return -1

    cmd = [sys.executable, "-m", "codebook_lens.cli", "cache", str(tmp_path / "m"), *args]
    cmd += ["--out", str(out), "--resume"]
    progress = []
    for attempt in range(3):
        before = rows()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            end = time.monotonic() + 120
            while rows() <= before + 40 and proc.poll() is None and time.monotonic() < end:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))  # a random moment after a checkpoint
            assert proc.poll() is None, f"attempt {attempt} ended early: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        progress.append(rows())
    assert progress == sorted(progress) and progress[0] > 0, progress
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert files_of(out) == files_of(ref)


# --------------------------------------------------------------- shards
def test_shards_open_as_the_unsharded_cache(
    tmp_path: Path,
    tok,
    model,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    kw = {"seq_len": 16, "max_tokens": 700, "progress": False}
    whole = build_cache(model, tok, corpus(12), tmp_path / "whole", **kw)  # type: ignore[arg-type]
    root = tmp_path / "sharded"
    build_cache(model, tok, corpus(12), root, shard=(2, 3), **kw)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"2 of 3 shards are missing or unfinished: shard-00000-of-00003"
    ):
        CodeCache(root)
    build_cache(model, tok, corpus(12), root, shard=(0, 3), **kw)  # type: ignore[arg-type]
    assert not (root / "manifest.json").exists()
    build_cache(model, tok, corpus(12), root, shard=(1, 3), **kw)  # type: ignore[arg-type]
    assert (root / "manifest.json").is_file()  # the last shard merged: a manifest, no copy
    merged = json.loads((root / "manifest.json").read_text())
    assert [s["path"] for s in merged["shards"]] == [shard_name(i, 3) for i in range(3)]
    assert sum(s["n_tokens"] for s in merged["shards"]) == whole.n_tokens == 700
    sharded = CodeCache(root)
    assert sharded.sharded and len(sharded.parts) == 3
    assert all(p.n_tokens > 150 for p in sharded.parts)  # balanced by tokens
    same_cache(sharded, whole)
    assert list(sharded.windows()) == list(whole.windows())
    pat = make_pattern(sharded, regex=r"\bMay\b|market")
    assert np.array_equal(pat.positions, make_pattern(whole, regex=r"\bMay\b|market").positions)
    assert search(sharded, pat, top=None) == search(whole, pat, top=None)
    for name in sharded.codebooks:
        head = 1 if sharded.info(name).grouped else None
        assert (
            code_profile(sharded, name, 2, head).to_dict()
            == code_profile(whole, name, 2, head).to_dict()
        )
    assert verify_cache(root) == []
    # a shard rebuilt after merging no longer matches the merged manifest
    stale = (root / "manifest.json").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    build_cache(model, tok, corpus(12), root, shard=(1, 3), overwrite=True, **kw)  # type: ignore[arg-type]
    same_cache(CodeCache(root), whole)  # merged again by the rebuilt shard
    (root / "manifest.json").write_bytes(stale)
    with pytest.raises(ValueError, match="rebuilt after merging"):
        CodeCache(root)
    assert any("rebuilt after" in p.what for p in verify_cache(root))
    # shards of different builds do not mix
    (root / "manifest.json").unlink()
    build_cache(
        model, tok, corpus(12), root, shard=(1, 3), overwrite=True, **{**kw, "max_tokens": 650}
    )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="build differs from shard-00000-of-00003"):
        CodeCache(root)


def test_synthetic_shards_search_and_parallel_equal_serial(tmp_path: Path) -> None:
    kw = {"n_tokens": 9_000, "n_codebooks": 3, "groups": 2, "num_codes": 48, "k": 3}
    one = synthetic_cache(tmp_path / "one", plant={"May": 7}, **kw)  # type: ignore[arg-type]
    four = synthetic_cache(tmp_path / "four", plant={"May": 7}, shards=4, index="none", **kw)  # type: ignore[arg-type]
    assert len(four.parts) == 4
    same_cache(four, one)
    for query in (
        {"regex": r"\bMay\b"},
        {"regex": "Ma[yr]|the"},
        {"token": "the"},
        {"docs_label": "sport"},
    ):
        pat = make_pattern(one, **query)  # type: ignore[arg-type]
        par = make_pattern(four, workers=2, **query)  # type: ignore[arg-type]
        assert np.array_equal(pat.positions, par.positions), query
        want = search(one, pat, top=None, workers=1)
        assert search(one, pat, top=None, workers=2) == want
        assert search(four, par, top=None, workers=3) == want
        assert search(four, par, top=None, workers=1) == want
    best = search_pattern(four, regex=r"\bMay\b", top=1, workers=2).matches[0]
    assert (best.codebook, best.head, best.code, best.precision, best.recall) == (
        "layers.0.attn_heads", 0, 7, 1.0, 1.0
    )  # fmt: skip
    hits = all_code_hits(four, list(four.codebooks), np.arange(0, 9_000, 7), workers=2)
    for name, h in hits.items():
        codes = np.asarray(one.codes(name))[np.arange(0, 9_000, 7)]
        for g in range(2):
            assert np.array_equal(h[g], np.bincount(codes[:, g].ravel(), minlength=48))
    assert np.array_equal(
        four.positions("layers.2.attn_heads", 5, 1), one.positions("layers.2.attn_heads", 5, 1)
    )
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        search(one, pat, workers=0)


def test_sharded_array_indexes_like_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 9, size=(n, 3, 2)) for n in (4, 1, 6)]
    whole = np.concatenate(parts)
    arr = ShardedArray(parts)
    assert arr.shape == whole.shape and len(arr) == 11
    idx = np.array([10, 0, 4, 4, 5, -1])
    for key in (3, -2, slice(2, 9), slice(None), slice(9, 2), slice(1, 10, 3), idx,
                (idx, 1), (idx, 1, slice(None)), (slice(3, 8), 2), (7, 0, 1), (idx, slice(None), 0),
                whole[:, 0, 0] > 4):  # fmt: skip
        assert np.array_equal(arr[key], whole[key]), key
    assert np.array_equal(np.asarray(arr), whole)
    with_add = ShardedArray(parts, add=[0, 100, 200])
    assert with_add[4].tolist() == (whole[4] + 100).tolist()  # row 4 opens the second part
    with pytest.raises(IndexError):
        arr[11]


def test_resolve_shard_from_flags_and_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard(None, None, "cuda") == (None, "cuda")
    assert resolve_shard(4, 1, None) == ((1, 4), None)
    with pytest.raises(ValueError, match="--shards needs --shard"):
        resolve_shard(4, None)
    with pytest.raises(ValueError, match=r"shard=4 of shards=4 is invalid"):
        resolve_shard(4, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_shard(None, None, "cuda") == ((1, 2), "cuda:1")


def test_cli_shards_under_torchrun_env(
    tmp_path: Path,
    tok,
    model,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """Each rank (here: the RANK/WORLD_SIZE that torchrun sets) writes its shard."""
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    data = tmp_path / "data"
    data.mkdir()
    for i, d in enumerate(corpus(2)):
        (data / f"{i:02d}.txt").write_text(d.text)
    out = tmp_path / "c"
    argv = ["cache", str(tmp_path / "m"), "--data", str(data), "--out", str(out), "--seq-len", "16"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 0
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*argv[:-4], "--out", str(tmp_path / "whole"), "--seq-len", "16"]) == 0
    same_cache(CodeCache(out), CodeCache(tmp_path / "whole"))


@pytest.mark.slow  # three interpreters importing torch: ~20-60 s on 2 busy cores
def test_torchrun_ranks_write_one_cache(tmp_path: Path, tok, model) -> None:  # type: ignore[no-untyped-def]
    """Under a real ``torchrun`` the ranks run at once, each writing its shard; whichever
    finishes last merges, and the result reads as the cache of one process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    data = tmp_path / "data"
    data.mkdir()
    for i, d in enumerate(corpus(3)):
        (data / f"{i:02d}.txt").write_text(d.text)
    args = ["cache", str(tmp_path / "m"), "--data", str(data), "--seq-len", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(root / "src")}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "codebook_lens.cli", *args,
         "--out", str(tmp_path / "c")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = CodeCache(tmp_path / "c")
    assert sharded.sharded and [p.path.name for p in sharded.parts] == [
        shard_name(0, 2), shard_name(1, 2)
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' threads: the same floats
    try:
        assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    finally:
        torch.set_num_threads(threads)
    same_cache(sharded, CodeCache(tmp_path / "whole"))
    assert verify_cache(tmp_path / "c") == []


def test_a_dropped_cache_is_freed_at_once(tmp_path: Path) -> None:
    """No reference cycle keeps a cache (and its memory-mapped pages) alive after its last
    reference goes: repeated opens do not pile up mappings until a garbage collection."""
    import gc
    import weakref

    one = synthetic_cache(tmp_path / "one", n_tokens=2_000)
    four = synthetic_cache(tmp_path / "four", n_tokens=2_000, shards=4)
    gc.disable()
    try:
        for path in (one.path, four.path):
            c = CodeCache(path)
            for name in c.codebooks:
                c.codes(name)[:10]
                c.code_counts(name)
            search_pattern(c, regex="the")
            ref = weakref.ref(c)
            parts = [weakref.ref(p) for p in c.parts]
            del c
            assert ref() is None and all(p() is None for p in parts), path
    finally:
        gc.enable()


def test_merge_shards_is_a_manifest(tmp_path: Path) -> None:
    c = synthetic_cache(tmp_path / "c", n_tokens=3_000, shards=3)
    before = {p: p.stat().st_size for p in c.path.rglob("*.npy")}
    (c.path / "manifest.json").unlink()
    CodeCache(c.path)  # derived on opening
    merge_shards(c.path)
    assert {p: p.stat().st_size for p in c.path.rglob("*.npy")} == before
    assert (c.path / "manifest.json").stat().st_size < 4_000
    assert json.loads((c.path / "manifest.json").read_text())["version"] == cache_mod.CACHE_VERSION


@pytest.mark.slow  # builds four small caches and starts a worker pool: ~15-30 s on 2 cores
def test_bench_search_scale_tiny_writes_exponents(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_search.py"
    spec = importlib.util.spec_from_file_location("bench_search_scale_under_test", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"search": {"kept": True}}))
    assert bench.main(["--scale", "--tiny", "--results", str(out), "--scratch", str(tmp_path)]) == 0
    saved = json.loads(out.read_text())
    assert saved["search"] == {"kept": True}
    scale = saved["scale"]
    assert scale["tokens"] == [5_000, 10_000, 20_000]
    for key in (
        "build_seconds",
        "disk_bytes",
        "build_peak_bytes",
        "query_seconds",
        "query_peak_bytes",
        "build_mapped_peak_bytes",
        "query_mapped_peak_bytes",
    ):
        assert len(scale[key]["values"]) == 3 and np.isfinite(scale[key]["exponent"])
    # disk grows with tokens: more tokens, more bytes
    assert scale["disk_bytes"]["values"] == sorted(scale["disk_bytes"]["values"])
    assert scale["disk_bytes"]["exponent"] > 0.5
    wide = scale["codebooks_384"]
    assert wide["codebooks"] == 12 and len(wide["queries"]) == 4 and wide["index"] == "none"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # every cache deleted


def test_hits_with_wide_keys_equal_brute_force(tmp_path: Path) -> None:
    """More than 2**16 (head, code) keys: counted head by head; same answers."""
    c = synthetic_cache(tmp_path / "c", n_tokens=1_500, n_codebooks=1, groups=3, num_codes=30_000)
    pos = np.arange(0, 1_500, 3)
    got = all_code_hits(c, ["layers.0.attn_heads"], pos)["layers.0.attn_heads"]
    codes = np.asarray(c.codes("layers.0.attn_heads"))[pos]
    for g in range(3):
        assert np.array_equal(got[g], np.bincount(codes[:, g].ravel(), minlength=30_000))
    assert np.array_equal(
        all_code_hits(c, ["layers.0.attn_heads"], np.arange(1_500))["layers.0.attn_heads"],
        c.code_counts("layers.0.attn_heads"),
    )


def test_default_regex_time_limit_grows_with_the_cache(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from codebook_lens.codes.search import DEFAULT_REGEX_TIMEOUT, regex_timeout

    small = synthetic_cache(tmp_path / "c", n_tokens=500)
    assert regex_timeout(small) == DEFAULT_REGEX_TIMEOUT
    big = SimpleNamespace(n_tokens=16_000_000)
    assert regex_timeout(big) == 16 * DEFAULT_REGEX_TIMEOUT  # type: ignore[arg-type]
    assert make_pattern(small, regex="the").size > 0  # the default limit applies


def test_top_is_the_head_of_the_full_ranking(tmp_path: Path) -> None:
    """Pruning to the codes that can still rank changes nothing, ties included."""
    c = synthetic_cache(tmp_path / "c", n_tokens=4_000, n_codebooks=3, groups=2, num_codes=40)
    for query in ({"regex": "the|a"}, {"docs_label": "sport"}):
        pat = make_pattern(c, **query)  # type: ignore[arg-type]
        for sort_by in ("f1", "precision", "recall", "count"):
            full = search(c, pat, top=None, sort_by=sort_by).matches  # type: ignore[arg-type]
            assert len(full) > 4 * 5
            for top in (1, 5, 13):
                got = search(c, pat, top=top, sort_by=sort_by).matches  # type: ignore[arg-type]
                assert got == full[:top], (query, sort_by, top)


@pytest.mark.slow  # two interpreter start-ups and a worker pool: ~20 s on 2 busy cores
def test_parallel_search_from_an_unguarded_script_and_from_stdin(tmp_path: Path) -> None:
    """Workers never import the caller's script: no second run of its top level, and code
    read from stdin (which has no file to import) works too."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    synthetic_cache(tmp_path / "c", n_tokens=3_000, plant={"May": 7})
    marker = tmp_path / "runs.txt"
    script = (
        "from codebook_lens.codes.cache import CodeCache\n"
        "from codebook_lens.codes.search import search_pattern\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        f"r = search_pattern(CodeCache({str(tmp_path / 'c')!r}), regex='May', workers=2)\n"
        "print(r.matches[0].code, r.matches[0].precision)\n"
    )
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    for argv, stdin in (([str(tmp_path / "script.py")], None), (["-"], script)):
        proc = subprocess.run(
            [sys.executable, *argv], input=stdin, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["7", "1.0"]
    assert marker.read_text() == "run\nrun\n"  # once per interpreter, never in a worker
