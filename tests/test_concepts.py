"""Concept battery: battery files, scoring on planted codes and neurons, the k-means control,
activations of a plain model, and the experiment end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import regex
from helpers.synthetic import synthetic_cache

from codebook_lens.experiments.concepts import (
    Concept,
    ConceptsConfig,
    SiteCodes,
    builtin_battery_path,
    code_counts,
    concept_positions,
    kmeans_codes,
    load_battery,
    score_concepts,
    summarize,
)


# ----------------------------------------------------------------- battery
def test_builtin_battery_is_shipped_and_valid() -> None:
    battery = load_battery()
    assert builtin_battery_path().is_file()
    assert len(battery) >= 25
    assert len({c.name for c in battery}) == len(battery)
    kinds = {c.kind for c in battery}
    assert kinds == {"regex", "token", "tokens", "docs"}
    for c in battery:
        if c.kind == "regex":
            regex.compile(str(c.query))  # every regex compiles
    by = {c.name: c for c in battery}
    months = regex.compile(str(by["months"].query))
    assert months.findall("In May and June, not Mayhem") == ["May", "June"]
    plural = regex.compile(str(by["plural -s nouns"].query))
    assert plural.findall("the shares of these firms and this is") == ["shares", "firms"]
    initial = regex.compile(str(by["sentence-initial capitals"].query))
    assert initial.findall('It fell. Shares rose! "The end.') == ["Shares"]
    assert sorted(c.query for c in battery if c.kind == "docs") == [
        "business", "entertainment", "politics", "sports", "tech",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concepts: []", "expected a non-empty list"),
        ("concepts:\n  - {name: a, regex: x, token: y}", "give exactly one of regex"),
        ("concepts:\n  - {name: a}", "give exactly one of regex"),
        ("concepts:\n  - {name: a, regexp: x}", "unknown keys \\['regexp'\\]"),
        ("concepts:\n  - {name: a, token: x}\n  - {name: a, token: y}", "used twice"),
        ("concepts:\n  - {name: a, tokens: []}", "'tokens' must be a non-empty list"),
        ("concepts:\n  - {regex: x}", "'name' must be a non-empty string"),
        ("concepts: [", "not valid YAML"),
    ],
)
def test_battery_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_battery(path)


def test_battery_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such battery file"):
        load_battery(tmp_path / "nope.yaml")


def test_battery_reads_numbers_as_token_strings(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("- {name: year, token: 2004, description: a year}\n- {name: d, docs: sport}")
    got = load_battery(path)
    assert got == [Concept("year", "token", "2004", "a year"), Concept("d", "docs", "sport")]


def test_concept_positions_of_each_kind(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "c", n_tokens=2_000, plant={"May": 7})
    tokens = np.asarray(cache.tokens)
    may = {i for i, s in enumerate(cache.vocab) if s.strip() == "May"}
    want = np.flatnonzero(np.isin(tokens, list(may)))
    assert len(want) > 0
    got = concept_positions(cache, Concept("m", "regex", r"\bMay\b"))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(concept_positions(cache, Concept("m", "token", "May")), want)
    both = concept_positions(cache, Concept("s", "tokens", ["May", "June"]))
    june = concept_positions(cache, Concept("j", "token", "June"))
    np.testing.assert_array_equal(both, np.union1d(want, june))
    sport = concept_positions(cache, Concept("d", "docs", "sport"))
    assert len(sport) and all(cache.docs[int(cache.doc_ids[p])].label == "sport" for p in sport)
    assert len(concept_positions(cache, Concept("d", "docs", "cooking"))) == 0
    with pytest.raises(ValueError, match="concept 'bad'.*invalid"):
        concept_positions(cache, Concept("bad", "regex", "(unclosed"))


# ----------------------------------------------------------------- scoring
def _trained(cache) -> dict[str, SiteCodes]:  # type: ignore[no-untyped-def]
    return {
        name: SiteCodes(np.asarray(cache.codes(name)), info.num_codes, info.grouped)
        for name, info in cache.codebooks.items()
    }


def test_planted_code_is_found_with_precision_and_recall_one(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "c", n_tokens=6_000, num_codes=64, k=2, plant={"May": 7})
    concepts = [Concept("may", "regex", r"\bMay\b"), Concept("june", "token", "June")]
    pos = {c.name: concept_positions(cache, c) for c in concepts}
    res = score_concepts(concepts, pos, cache.n_tokens, _trained(cache), min_count=1)
    may = res[0]
    assert may.code is not None
    assert (may.code.codebook, may.code.code) == ("layers.0.mlp_out", 7)
    assert may.code.precision == 1.0 and may.code.recall == 1.0 and may.code.f1 == 1.0
    assert may.code.count == may.tokens == len(pos["may"])
    assert may.precise is not None and may.precise.code == 7 and may.precise.recall == 1.0
    # Random codes are poor detectors of an unplanted word.
    assert res[1].code is not None and res[1].code.f1 < 0.5
    assert res[1].precise is None or res[1].precise.recall < 0.3


def test_planted_neuron_beats_random_codes(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "c", n_tokens=6_000, num_codes=64, k=2, plant={"May": 7})
    n = cache.n_tokens
    concepts = [Concept("june", "token", "June"), Concept("may", "token", "May")]
    pos = {c.name: concept_positions(cache, c) for c in concepts}
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, 16)).astype(np.float32)
    acts[pos["june"], 3] += 6.0  # neuron 3 fires on "June"
    site_acts = {name: acts for name in cache.codebooks}
    res = score_concepts(
        concepts, pos, n, _trained(cache), activations=site_acts, control=_trained(cache)
    )
    june, may = res
    assert june.neuron is not None and june.neuron.neuron == 3 and june.neuron.sign == 1
    assert june.neuron.f1 > 0.99 and june.neuron.f1 > june.code_f1
    assert june.neuron.site == june.code.codebook  # type: ignore[union-attr]
    # The planted code beats every neuron; the control (here the same codes) ties, no win.
    assert may.code_f1 == 1.0 and may.neuron is not None and may.neuron.f1 < 1.0
    assert may.control is not None and may.control.f1 == may.code_f1
    s = summarize(res)
    assert s["code_beats_neuron"] == 0.5 and s["code_beats_neuron_concepts"] == ["may"]
    assert s["code_beats_control"] == 0.0
    assert s["precise_concepts"] == 1 and s["precise_concept_names"] == ["may"]
    assert s["targets"]["code_beats_neuron"]["met"] is False


def test_score_concepts_only_uses_the_first_tokens(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "c", n_tokens=4_000, plant={"May": 7})
    c = Concept("may", "token", "May")
    pos = {"may": concept_positions(cache, c)}
    half = 2_000
    res = score_concepts([c], pos, half, _trained(cache))[0]
    assert res.tokens == int((pos["may"] < half).sum())
    assert res.code is not None and res.code.count == res.tokens and res.code.recall == 1.0
    with pytest.raises(ValueError, match="occur on none"):
        score_concepts([c], {"may": pos["may"][pos["may"] >= 3_990]}, 10, _trained(cache))


def test_code_counts_matches_a_loop() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 9, size=(50, 3, 2))
    rows = np.array([1, 4, 9, 30])
    got = code_counts(codes, 9, rows)
    want = np.zeros((3, 9), dtype=np.int64)
    for r in rows:
        for g in range(3):
            for c in codes[r, g]:
                want[g, c] += 1
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ control
def test_kmeans_control_recovers_clusters() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2, 4, 8)) * 5  # 2 groups, 4 clusters each, width 8
    labels = rng.integers(0, 4, size=(400, 2))
    x = centers[np.arange(2)[None], labels] + 0.05 * rng.standard_normal((400, 2, 8))
    acts = x.reshape(400, 16).astype(np.float32)
    codes = kmeans_codes(acts, num_codes=4, k=2, groups=2, iters=10, fit_tokens=400, seed=0)
    assert codes.shape == (400, 2, 2)
    assert (codes[:, :, 0] != codes[:, :, 1]).all()  # top-k ids are distinct
    for g in range(2):  # each cluster maps to one code and each code to one cluster
        pairs = set(zip(labels[:, g].tolist(), codes[:, g, 0].tolist(), strict=True))
        assert len(pairs) == 4 and len({c for _, c in pairs}) == 4
    again = kmeans_codes(acts, num_codes=4, k=2, groups=2, iters=10, fit_tokens=400, seed=0)
    np.testing.assert_array_equal(codes, again)  # seeded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny saved codebook model (heads + MLP codebooks) and a cache of it."""
    from test_cache import docs, small_model, small_tokenizer

    from codebook_lens.codes.cache import build_cache

    root = tmp_path_factory.mktemp("concepts")
    tok = small_tokenizer()
    model = small_model(len(tok))
    model.save_pretrained(root / "model", tokenizer=tok)
    build_cache(model, tok, docs(), root / "cache", seq_len=16, progress=False)
    return model, root


def test_module_activations_equal_site_activations(tiny: tuple[Any, Path]) -> None:
    """Layer 0's codebook input does not depend on any quantization: the plain model's capture
    at the same module equals ``analysis.site_activations``."""
    from codebook_lens.codes.analysis import site_activations
    from codebook_lens.codes.cache import load_cache
    from codebook_lens.experiments.concepts import module_activations

    model, root = tiny
    cache = load_cache(root / "cache")
    site = next(s for s in model.sites if s.name == "layers.0.attn_heads")
    want = site_activations(model, cache, site.name, max_tokens=100)
    with model.disabled():
        got = module_activations(model.base, cache, site.module, site.hook, max_tokens=100)
    assert got.shape == want.shape == (min(100, cache.n_tokens), site.dim)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="not a module"):
        module_activations(model.base, cache, "no.such", "input", max_tokens=10)


# --------------------------------------------------------------- end to end
def test_config_errors() -> None:
    with pytest.raises(ValueError, match="max_tokens=0 is invalid"):
        ConceptsConfig(max_tokens=0)
    with pytest.raises(ValueError, match="min_precision=0.0 is invalid"):
        ConceptsConfig(min_precision=0.0)
    with pytest.raises(ValueError, match="needs the model it was built with"):
        ConceptsConfig(cache="runs/c")


def test_experiment_on_a_saved_model(tmp_path: Path, tiny: tuple[Any, Path]) -> None:
    from codebook_lens.experiments.concepts import run_concepts

    _, root = tiny
    battery = tmp_path / "b.yaml"
    battery.write_text(
        "concepts:\n"
        "  - {name: months, regex: '\\b(?:May|June|March)\\b'}\n"
        "  - {name: the, tokens: [the, The]}\n"
        "  - {name: sport docs, docs: sport}\n"
        "  - {name: absent, regex: 'zebra'}\n"
        "  - {name: no docs, docs: cooking}\n"
    )
    cfg = ConceptsConfig(
        out=str(tmp_path / "out"),
        model=str(root / "model"),
        cache=str(root / "cache"),
        concepts=str(battery),
        min_tokens=2,
        kmeans_iters=3,
        progress=False,
    )
    metrics = run_concepts(cfg)
    assert list(metrics["concepts"]) == ["months", "the", "sport docs"]
    assert [s["name"] for s in metrics["skipped"]] == ["absent", "no docs"]
    assert "not in the cache" in metrics["skipped"][1]["reason"]
    for m in metrics["concepts"].values():
        for unit in ("code", "neuron", "control"):
            assert 0.0 <= m[unit]["precision"] <= 1.0 and 0.0 <= m[unit]["f1"] <= 1.0
        assert m["neuron"]["site"] == m["code"]["codebook"] == m["control"]["codebook"]
        assert m["neuron_any_site"]["f1"] >= m["neuron"]["f1"]
        assert m["contexts"] and "[[" in m["contexts"][0]
    assert metrics["base"].startswith("the codebook model with its codebooks switched off")
    s = metrics["summary"]
    assert s["concepts"] == 3 and 0.0 <= s["code_beats_neuron"] <= 1.0
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"] == s
    md = (out / "report.md").read_text()
    assert "| concept | tokens | best code |" in md and "months" in md
    for name in ("report.html", "concepts_scatter.png"):
        assert (out / name).is_file()


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from codebook_lens.cli import main

    out = tmp_path / "concepts"
    assert main(["experiment", "concepts", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "code beats neuron" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"] == str(out / "base")  # trained like `experiment topics`
    assert len(metrics["concepts"]) + len(metrics["skipped"]) == len(load_battery())
    assert (out / "report.html").is_file() and (out / "model" / "config.json").is_file()


def test_code_counts_skip_unfired_sae_slots() -> None:
    from codebook_lens.experiments.concepts import code_counts

    codes = np.array([[[0, 3]], [[2, 3]], [[0, 1]]])  # (3 tokens, 1 group, k=2); 3 = unfired
    assert code_counts(codes, 3).tolist() == [[2, 1, 1]]
