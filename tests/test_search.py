"""Code search: planted associations, hand-computed precision/recall, profiles, health,
the neuron baseline, a tiny model end to end, the CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.synthetic import synthetic_cache
from test_cache import TEXTS, docs, small_model, small_tokenizer

from codebook_lens.cli import main
from codebook_lens.codes.analysis import (
    best_neuron,
    best_neurons,
    codebook_health,
    neuron_baseline,
    plot_health,
    promoted_tokens,
    site_activations,
)
from codebook_lens.codes.cache import (
    CacheWriter,
    CodebookInfo,
    CodeCache,
    build_cache,
)
from codebook_lens.codes.search import (
    code_contexts,
    code_labels,
    code_profile,
    code_tokens,
    make_pattern,
    profile_html,
    search,
    search_loop,
    search_pattern,
    similar_codes,
    token_codes,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> CodeCache:
    """Code 7 of layers.0.attn_heads head 0 fires exactly on "May"."""
    return synthetic_cache(
        tmp_path_factory.mktemp("syn") / "c",
        n_tokens=20_000,
        n_codebooks=3,
        num_codes=64,
        k=4,
        groups=2,
        plant={"May": 7},
    )


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> CodeCache:
    """Six tokens with codes chosen by hand (k=2, C=5, one ungrouped codebook)::

    doc "a": "the cat sat"   tokens 0-2, codes [0,1] [1,2] [0,3]
    doc "b": "the dog ran"   tokens 3-5, codes [0,4] [1,2] [2,3]
    """
    info = CodebookInfo("cb", "mlp_out", 0, 1, False, 2, 5, 8)
    vocab = ["the", " cat", " sat", " dog", " ran"]
    with CacheWriter(
        tmp_path_factory.mktemp("hand") / "c", codebooks=[info], identity={}, vocab=vocab
    ) as w:
        w.add_document("a", "the cat sat", "pets")
        w.add_tokens(
            np.array([0, 1, 2]),
            np.array([[0, 3], [4, 7], [8, 11]]),
            {"cb": np.array([[0, 1], [1, 2], [0, 3]])},
        )
        w.add_document("b", "the dog ran", "dogs")
        w.add_tokens(
            np.array([0, 3, 4]),
            np.array([[0, 3], [4, 7], [8, 11]]),
            {"cb": np.array([[0, 4], [1, 2], [2, 3]])},
        )
        return w.finish()


# ------------------------------------------------------------------- search
def test_planted_code_ranks_first_with_perfect_scores(planted: CodeCache) -> None:
    for query in ({"regex": r"\bMay\b"}, {"token": "May"}):
        res = search_pattern(planted, **query, top=5)  # type: ignore[arg-type]
        best = res.matches[0]
        assert (best.codebook, best.head, best.code) == ("layers.0.attn_heads", 0, 7)
        assert best.precision == 1.0 and best.recall == 1.0 and best.f1 == 1.0
        assert best.count == best.hits == res.pattern_tokens > 0
        assert all(m.f1 < 0.1 for m in res.matches[1:])


def test_precision_recall_by_hand(hand: CodeCache) -> None:
    # pattern "the" = tokens 0 and 3: code 0 fires on 0, 2, 3 -> P = 2/3, R = 2/2
    res = search_pattern(hand, regex=r"\bthe\b", top=None)
    got = {m.code: (m.precision, m.recall, m.hits, m.count) for m in res.matches}
    assert res.pattern_tokens == 2
    assert got[0] == pytest.approx((2 / 3, 1.0, 2, 3))
    assert got[1] == pytest.approx((1 / 3, 1 / 2, 1, 3))  # code 1 on tokens 0, 1, 4
    assert got[4] == pytest.approx((1.0, 1 / 2, 1, 1))
    assert set(got) == {0, 1, 4}  # codes 2 and 3 never fire on "the"
    assert res.matches[0].code == 0  # best F1: 0.8
    assert res.matches[0].f1 == pytest.approx(0.8)
    # a match inside a token selects the token; one spanning two tokens selects both
    assert make_pattern(hand, regex="at").positions.tolist() == [1, 2]
    assert make_pattern(hand, regex="cat s").positions.tolist() == [1, 2]
    # documents: label "dogs" = tokens 3..5; code 2 fires on 1, 4, 5 -> P = 2/3, R = 2/3
    res = search_pattern(hand, docs_label="dogs", top=None)
    got = {m.code: (m.precision, m.recall) for m in res.matches}
    assert got[2] == pytest.approx((2 / 3, 2 / 3))
    assert got[4] == pytest.approx((1.0, 1 / 3))


def test_thresholds_min_count_top_and_sort(hand: CodeCache) -> None:
    pat = make_pattern(hand, regex=r"\bthe\b")
    assert [m.code for m in search(hand, pat, min_count=2, top=None).matches] == [0, 1]
    assert [m.code for m in search(hand, pat, min_precision=0.9, top=None).matches] == [4]
    assert [m.code for m in search(hand, pat, min_recall=0.9, top=None).matches] == [0]
    assert [m.code for m in search(hand, pat, sort_by="precision", top=None).matches] == [4, 0, 1]
    assert len(search(hand, pat, top=1).matches) == 1
    assert search_pattern(hand, regex="zebra").matches == []


@pytest.mark.parametrize("query", [r"Ma[yr]", r"\bthe\b", "goal|team"])
def test_vectorised_search_equals_per_code_loop(planted: CodeCache, query: str) -> None:
    pat = make_pattern(planted, regex=query)
    res = search(planted, pat, top=None)
    for name in planted.codebooks:
        want = sorted(search_loop(planted, pat, name))
        got = sorted((m.head, m.code, m.hits) for m in res.matches if m.codebook == name)
        assert got == want


def test_result_objects_serialise_to_json(planted: CodeCache) -> None:
    res = search_pattern(planted, regex="May", top=3)
    data = json.loads(json.dumps(res.to_dict()))
    assert data["matches"][0]["code"] == 7
    prof = code_profile(planted, "layers.0.attn_heads", 7, 0)
    assert json.loads(json.dumps(prof.to_dict()))["count"] == prof.count


# ------------------------------------------------------------------- errors
def test_bad_inputs(planted: CodeCache) -> None:
    with pytest.raises(ValueError, match=r"regex='\(May' is invalid: missing \)"):
        make_pattern(planted, regex="(May")
    with pytest.raises(ValueError, match="codebook='nope' is not in this cache; choose one of"):
        search_pattern(planted, regex="May", codebooks=["nope"])
    with pytest.raises(ValueError, match=r"code=64 is out of range .* 0 \.\. 63"):
        code_profile(planted, "layers.0.attn_heads", 64, 0)
    with pytest.raises(ValueError, match="has 2 heads; give head="):
        code_tokens(planted, "layers.0.attn_heads", 7)
    with pytest.raises(ValueError, match="label='poetry' matches no document.*sport"):
        make_pattern(planted, docs_label="poetry")
    with pytest.raises(ValueError, match="exactly one pattern"):
        make_pattern(planted, regex="a", token="b")
    with pytest.raises(ValueError, match="sort_by='size' is invalid"):
        search_pattern(planted, regex="May", sort_by="size")  # type: ignore[arg-type]


def _aaab_cache(path: Path) -> CodeCache:
    info = CodebookInfo("cb", "mlp_out", 0, 1, False, 1, 4, 8)
    with CacheWriter(path, codebooks=[info], identity={}, vocab=["a"]) as w:
        text = "a" * 40 + "b"
        w.add_document("d", text, None)
        w.add_tokens(np.zeros(1, np.int32), np.array([[0, len(text)]]), {"cb": np.zeros((1, 1))})
        return w.finish()


def test_catastrophic_regex_times_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = _aaab_cache(tmp_path / "c")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"timed out after 0.2 s.*backtracking"):
        make_pattern(cache, regex=r"(a|aa)+$", timeout=0.2)
    assert time.monotonic() - t0 < 15
    assert main(["search", str(cache.path), "--regex", "(a|aa)+$", "--timeout", "0.1"]) == 2
    assert "timed out after 0.1 s" in capsys.readouterr().err


# ----------------------------------------------------------- reverse search
def test_reverse_search_contexts_and_similar_codes(planted: CodeCache) -> None:
    toks = code_tokens(planted, "layers.0.attn_heads", 7, 0)
    assert [t.text for t in toks] == [" May"] and toks[0].share == 1.0 == toks[0].coverage
    labels = code_labels(planted, "layers.0.attn_heads", 7, 0)
    assert sum(lab.count for lab in labels) == toks[0].count
    ctx = code_contexts(planted, "layers.0.attn_heads", 7, 0, n=5, window=20)
    assert len(ctx) == 5 and all(c.token == "May" for c in ctx)
    assert len({c.doc for c in ctx}) > 1  # spread over the cache, not one document
    assert ctx[0].render().count("[[May]]") == 1
    assert "\x1b[" in ctx[0].render("ansi")
    page = profile_html(code_profile(planted, "layers.0.attn_heads", 7, 0))
    assert page.count("<mark>May</mark>") == 20
    sim = similar_codes(planted, "layers.0.attn_heads", 7, 0, top=3)
    vec = planted.vectors("layers.0.attn_heads")
    assert vec is not None
    v = vec[0] / np.linalg.norm(vec[0], axis=1, keepdims=True)
    cos = v @ v[7]
    cos[7] = -2
    assert [s.code for s in sim] == list(np.argsort(-cos)[:3])
    assert sim[0].cosine == pytest.approx(float(cos.max()), rel=1e-6)


def test_token_codes_text_view(hand: CodeCache) -> None:
    rows = token_codes(hand, 3, 6)
    assert [r.text for r in rows] == ["the", "dog", "ran"]
    assert [r.codes["cb"] for r in rows] == [[[0, 4]], [[1, 2]], [[2, 3]]]
    with pytest.raises(ValueError, match=r"token range \[4, 9\) is invalid"):
        token_codes(hand, 4, 9)


def test_profile_rank_and_html_escaping(hand: CodeCache) -> None:
    prof = code_profile(hand, "cb", 4)
    assert prof.count == 1 and prof.contexts[0].token == "the"
    assert prof.usage_rank == 5  # counts: code0 3, code1 3, code2 3, code3 2, code4 1
    ctx = prof.contexts[0]
    ctx.left, ctx.token = "<script>", "a&b"
    assert ctx.render("html").startswith("&lt;script&gt;<mark>a&amp;b</mark>")


# ------------------------------------------------------------------- health
def test_health_by_hand(hand: CodeCache, tmp_path: Path) -> None:
    (h,) = codebook_health(hand)
    counts = np.array([3, 3, 3, 2, 1])
    p = counts / counts.sum()
    assert h.dead_codes == 0 and h.used_codes == 5
    assert h.entropy == pytest.approx(float(-(p * np.log(p)).sum()))
    assert h.max_entropy == pytest.approx(np.log(5))
    assert sum(h.hist_counts) == 5
    paths = plot_health(hand, tmp_path / "plots")
    assert {p.name for p in paths} == {"usage_cb.png", "summary.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_health_counts_dead_codes(planted: CodeCache) -> None:
    h = {s.codebook: s for s in codebook_health(planted)}
    # planting reserves code 7 in every head of codebook 0; it fires only in head 0
    assert h["layers.0.attn_heads"].dead_codes == 1
    assert h["layers.1.attn_heads"].dead_codes == 0


# ---------------------------------------------------------- neuron baseline
def test_best_neuron_by_hand_and_both_signs() -> None:
    acts = np.array(
        [[0.0, 5.0], [1.0, -3.0], [2.0, -4.0], [3.0, 1.0], [4.0, 2.0]], dtype=np.float32
    )
    lab = np.array([False, True, True, False, False])
    r = best_neuron(acts, lab)  # neuron 1 <= -3 picks exactly tokens 1 and 2
    assert (r.neuron, r.sign, r.threshold, r.f1) == (1, -1, -3.0, 1.0)
    assert (r.precision, r.recall, r.count, r.hits) == (1.0, 1.0, 2, 2)
    r = best_neuron(acts, np.array([False, False, False, True, True]))
    assert (r.neuron, r.sign, r.threshold, r.f1) == (0, 1, 3.0, 1.0)


def test_best_neuron_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    acts = rng.integers(-3, 4, size=(60, 5)).astype(np.float32)  # many ties
    lab = rng.random(60) < 0.3
    r = best_neuron(acts, lab, chunk_elems=100)  # several column chunks
    best = 0.0
    for j in range(5):
        for t in np.unique(acts[:, j]):
            for fires in (acts[:, j] >= t, acts[:, j] <= t):
                tp = (fires & lab).sum()
                best = max(best, 2 * tp / (fires.sum() + lab.sum()))
    assert r.f1 == pytest.approx(best)
    fires = acts[:, r.neuron] >= r.threshold if r.sign > 0 else acts[:, r.neuron] <= r.threshold
    assert r.count == fires.sum() and r.hits == (fires & lab).sum()
    with pytest.raises(ValueError, match="no positive token"):
        best_neuron(acts, np.zeros(60, dtype=bool))


def test_best_neurons_equals_one_label_at_a_time() -> None:
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(80, 6)).round(1)  # some ties
    labels = [rng.random(80) < p for p in (0.1, 0.3, 0.6)]
    many = best_neurons(acts, labels, chunk_elems=200)
    assert many == [best_neuron(acts, lab) for lab in labels]
    with pytest.raises(ValueError, match="acts must be"):
        best_neurons(acts, [labels[0][:10]])


# ---------------------------------------------------- a tiny model end to end
@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tok = small_tokenizer()
    model = small_model(len(tok))
    out = tmp_path_factory.mktemp("model") / "m"
    model.save_pretrained(out, tokenizer=tok)
    cache = build_cache(model, tok, docs(), out.parent / "cache", seq_len=16, progress=False)
    return model, tok, cache, out


def test_model_cache_search_and_activations(model_cache) -> None:  # type: ignore[no-untyped-def]
    model, tok, cache, _ = model_cache
    pat = make_pattern(cache, regex=r"\bMay\b")
    may = [p for p in range(cache.n_tokens) if cache.token_text(p).strip() == "May"]
    assert pat.positions.tolist() == may and len(may) == 12
    res = search(cache, pat, top=None)
    for name in cache.codebooks:  # scores agree with counting by hand over the codes array
        codes = np.asarray(cache.codes(name))
        for m in [m for m in res.matches if m.codebook == name][:5]:
            fires = (codes[:, m.head or 0, :] == m.code).any(axis=1)
            assert m.count == fires.sum() and m.hits == fires[may].sum()
    # the captured site activations reproduce the cached codes
    for name in ("layers.0.mlp_out", "layers.1.attn_heads"):
        acts = site_activations(model, cache, name, max_tokens=40)
        layer = model.codebooks[name]
        x = torch.from_numpy(acts).reshape(len(acts), layer.groups, layer.head_dim)
        got = layer.search(x).numpy()
        assert np.array_equal(got, np.asarray(cache.codes(name)[:40]))
    base = neuron_baseline(model, cache, pat, "layers.0.mlp_out", max_tokens=10_000)
    assert base.n_tokens == cache.n_tokens and base.pattern_tokens == 12
    assert 0 < base.neuron.f1 <= 1 and base.best_code is not None
    best = search(cache, pat, codebooks=["layers.0.mlp_out"], top=1).matches[0]
    assert base.best_code.f1 == pytest.approx(best.f1)


def test_promoted_tokens_direct_logit_effect(model_cache) -> None:  # type: ignore[no-untyped-def]
    model, _, cache, _ = model_cache
    got, note = promoted_tokens(model, cache, "layers.1.mlp_out", 3, top=5)
    assert got is not None and "final norm" in note
    vec = model.codebooks["layers.1.mlp_out"].codebook[0, 3].detach()
    ln = model.base.transformer.ln_f
    d = (vec - vec.mean()) / (vec - vec.mean()).pow(2).mean().sqrt() * ln.weight
    want = (model.base.lm_head.weight @ d).detach().numpy()
    assert [t.token_id for t in got] == list(np.argsort(-want)[:5])
    assert got[0].logit == pytest.approx(float(want.max()), rel=1e-4)
    heads, _ = promoted_tokens(model, cache, "layers.0.attn_heads", 2, head=1, top=4)
    assert heads is not None and len(heads) == 4
    assert heads[0].logit >= heads[-1].logit
    # The head's code vector goes through the output projection unquantized: the codebook's
    # own pre-hook on that projection must not touch it (same answer with codebooks off).
    with model.disabled():
        plain, _ = promoted_tokens(model, cache, "layers.0.attn_heads", 2, head=1, top=4)
    assert plain is not None
    assert [t.token_id for t in heads] == [t.token_id for t in plain]
    assert heads[0].logit == pytest.approx(plain[0].logit, rel=1e-5)


def test_cache_from_other_model_is_rejected(model_cache) -> None:  # type: ignore[no-untyped-def]
    _, tok, cache, _ = model_cache
    with pytest.raises(ValueError, match="different model"):
        site_activations(small_model(len(tok), seed=3), cache, "layers.0.mlp_out")


# ---------------------------------------------------------------------- CLI
def test_cli_end_to_end(model_cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    _, _, _, model_dir = model_cache
    data = tmp_path / "data"
    for i, t in enumerate(TEXTS):
        (data / ("sport" if "Sport" in t else "news")).mkdir(parents=True, exist_ok=True)
        (data / ("sport" if "Sport" in t else "news") / f"{i}.txt").write_text(t)
    out = tmp_path / "cache"
    assert (
        main(["cache", str(model_dir), "--data", str(data), "--tokens", "30", "--out", str(out)])
        == 0
    )
    cache = CodeCache(out)
    # documents take turns over labels, so 30 tokens hold both topics
    assert cache.n_tokens == 30 and [d.label for d in cache.docs[:2]] == ["news", "sport"]
    capsys.readouterr()
    assert main(["search", str(out), "--regex", "May", "--json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert 0 < len(rows) <= 3
    assert {"codebook", "code", "precision", "recall", "count"} <= set(rows[0])
    assert rows[0]["f1"] >= rows[-1]["f1"]
    assert (
        main(["search", str(out), "--docs-label", "sport", "--codebook", "layers.0.mlp_out"]) == 0
    )
    assert "layers.0.mlp_out" in capsys.readouterr().out
    html = tmp_path / "p.html"
    m = rows[0]
    argv = [
        "code",
        str(out),
        m["codebook"],
        str(m["code"]),
        "--model",
        str(model_dir),
        "--html",
        str(html),
        "--json",
    ]
    if m["head"] is not None:
        argv += ["--head", str(m["head"])]
    assert main(argv) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["count"] == m["count"] and prof["promoted"]
    assert "<mark>" in html.read_text()
    assert main(["stats", str(out), "--json", "--plots", str(tmp_path / "plots")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [s["codebook"] for s in stats] == list(cache.codebooks)
    assert (tmp_path / "plots" / "summary.png").is_file()
    assert (
        main(
            [
                "search",
                str(out),
                "--regex",
                "May",
                "--neuron-baseline",
                "--model",
                str(model_dir),
                "--codebook",
                "layers.0.mlp_out",
            ]
        )
        == 0
    )
    assert "best neuron" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["search", "{c}", "--regex", "(May"], "is invalid: missing )"),
        (["search", "{c}", "--regex", "May", "--codebook", "nope"], "codebook='nope' is not"),
        (["code", "{c}", "layers.0.attn_heads", "64", "--head", "0"], "out of range"),
        (["code", "{c}", "layers.0.attn_heads", "1", "--head", "9"], "head=9 is out of range"),
        (["stats", "{c}/missing"], "no such cache folder"),
    ],
)
def test_cli_errors_exit_2(
    planted: CodeCache, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.replace("{c}", str(planted.path)) for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_cache_from_other_model(model_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, tok, cache, _ = model_cache
    other = tmp_path / "other"
    small_model(len(tok), seed=5).save_pretrained(other, tokenizer=tok)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codebook_lens.cli",
            "code",
            str(cache.path),
            "layers.0.mlp_out",
            "1",
            "--model",
            str(other),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "built with a different model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_benchmark_runs_in_tiny_mode() -> None:
    """The benchmark checks its loop against the vectorised search and the planted code."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "regex \\bMay\\b" in proc.stdout and "vs loop" in proc.stdout
    assert "targets (total < 2 s, >= 10x vs loop):" in proc.stdout
