"""Topic steering experiment: the topic classifier, topic-code selection, quick end-to-end run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codebook_lens.experiments.topics import TopicClassifier, words

TRAIN = [
    ("the striker scored a goal in the cup match", "sport"),
    ("the coach praised the squad after the match", "sport"),
    ("a late goal won the league match for the club", "sport"),
    ("shares fell as the bank reported weak profits", "business"),
    ("the firm said profits rose and shares gained", "business"),
    ("oil prices pushed the bank to cut its forecast", "business"),
]


def test_words_are_lowercased_tokens() -> None:
    assert words("The BBC's 2004 report, re-issued!") == ["the", "bbc's", "report", "re", "issued"]


def test_classifier_learns_and_round_trips(tmp_path: Path) -> None:
    clf = TopicClassifier.fit([t for t, _ in TRAIN], [y for _, y in TRAIN], min_count=1)
    assert clf.labels == ["business", "sport"]
    assert clf.predict(["a goal in the match", "profits and shares"]) == ["sport", "business"]
    post = clf.log_posterior(["goal", "nothing known here"])
    np.testing.assert_allclose(np.exp(post).sum(1), 1.0)
    # No known word: the uniform prior gives equal odds (no pull towards a bigger topic).
    np.testing.assert_allclose(np.exp(post[1]), [0.5, 0.5])
    assert clf.top_words("sport", 3)[0] in {"match", "goal"}
    again = TopicClassifier.load(clf.save(tmp_path / "clf"))
    assert again.labels == clf.labels and again.vocab == clf.vocab
    np.testing.assert_array_equal(again.log_probs, clf.log_probs)
    assert clf.accuracy([t for t, _ in TRAIN], [y for _, y in TRAIN]) == 1.0


def test_classifier_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs >= 2 topics"):
        TopicClassifier.fit(["a b", "b c"], ["x", "x"])
    with pytest.raises(ValueError, match="alpha=0 is invalid"):
        TopicClassifier.fit(["a b", "b c"], ["x", "y"], alpha=0)
    with pytest.raises(FileNotFoundError, match="no saved topic classifier"):
        TopicClassifier.load(tmp_path)


# ---------------------------------------------------------------- topic codes
def _planted_cache(tmp_path: Path):
    """8 docs (4 'sport', 4 'business') x 10 tokens, one head codebook with 2 heads, k=2.

    Head 0: code 5 fires once in every sport doc (precision 1, coverage 1); code 6 fires in
    2 of the 4 sport docs (precision 1, coverage 0.5); code 7 fires once in every doc
    (precision 0.5). Head 1: code 5 fires on every sport token (precision 1, coverage 1).
    Everything else is background codes 10..19.
    """
    from codebook_lens.codes.cache import CacheWriter, CodebookInfo

    info = CodebookInfo("layers.0.attn_heads", "attn_heads", 0, 2, True, 2, 32, 8)
    rng = np.random.default_rng(0)
    with CacheWriter(
        tmp_path / "cache",
        codebooks=[info],
        identity={"base_model": "test"},
        vocab=["w"],
    ) as w:
        for d in range(8):
            label = "sport" if d % 2 == 0 else "business"
            w.add_document(f"d{d}", "w " * 10, label)
            codes = np.stack(
                [rng.choice(np.arange(10, 20), size=(2, 2), replace=False) for _ in range(10)]
            )  # (10 tokens, 2 heads, k=2), distinct per token and head
            if label == "sport":
                codes[0, 0, 0] = 5
                if d in (0, 2):
                    codes[1, 0, 0] = 6
                codes[:, 1, 0] = 5
            codes[2, 0, 0] = 7
            w.add_tokens(np.zeros(10, np.int32), np.tile([[0, 1]], (10, 1)), {info.name: codes})
        return w.finish()


def test_find_topic_codes_ranks_by_precision_and_coverage(tmp_path: Path) -> None:
    from codebook_lens.experiments.topics import find_topic_codes

    cache = _planted_cache(tmp_path)
    found = find_topic_codes(cache, "sport", n=5, max_per_head=5, min_precision=0.9, min_count=1)
    got = [(c.head, c.code) for c in found]
    assert got[:2] == [(1, 5), (0, 5)]  # more firings first among equal scores
    assert found[0].precision == 1.0 and found[0].coverage == 1.0 and found[0].count == 40
    assert (0, 6) in got and found[got.index((0, 6))].coverage == 0.5
    assert (0, 7) not in got  # fires everywhere: precision 0.5 < 0.9
    assert all(c.precision >= 0.9 for c in found)
    # The per-head cap and the total.
    one = find_topic_codes(cache, "sport", n=5, max_per_head=1, min_precision=0.9, min_count=1)
    assert [(c.head, c.code) for c in one] == [(1, 5), (0, 5)]
    assert (
        len(find_topic_codes(cache, "sport", n=1, max_per_head=5, min_precision=0.9, min_count=1))
        == 1
    )
    with pytest.raises(ValueError, match="matches no document"):
        find_topic_codes(cache, "tech", n=1, max_per_head=1, min_precision=0.5, min_count=1)


def test_steering_spec_forces_codes_per_head_everywhere() -> None:
    from codebook_lens.experiments.topics import TopicCode, steering_spec

    codes = [
        TopicCode("layers.0.attn_heads", 1, 5, 1.0, 1.0, 40),
        TopicCode("layers.0.attn_heads", 0, 5, 1.0, 1.0, 4),
        TopicCode("layers.0.attn_heads", 0, 6, 1.0, 0.5, 2),
    ]
    spec = steering_spec(codes, slot="append", scale=2.0)
    assert [(e.head, e.codes) for e in spec.edits] == [(1, [5]), (0, [5, 6])]
    assert all(
        e.positions == "all" and e.action == "force" and e.slot == "append" and e.scale == 2.0
        for e in spec.edits
    )


def test_cap_per_head_keeps_rank_order() -> None:
    from codebook_lens.experiments.topics import TopicCode, cap_per_head

    ranked = [TopicCode("cb", h, c, 1.0, 1.0, 1) for h, c in [(0, 1), (0, 2), (1, 3), (0, 4)]]
    assert [c.code for c in cap_per_head(ranked, None, 2)] == [1, 2, 3]
    assert [c.code for c in cap_per_head(ranked, 2, 1)] == [1, 3]


def test_token_topic_llr_counts_tokens_per_topic(tmp_path: Path) -> None:
    """sport docs: tokens 0,0,0,1; business docs: 1,1,2,2 (2 docs each, vocab of 4)."""
    from codebook_lens.codes.cache import CacheWriter, CodebookInfo
    from codebook_lens.experiments.topics import token_topic_llr

    info = CodebookInfo("layers.0.mlp_out", "mlp_out", 0, 1, False, 1, 8, 4)
    with CacheWriter(
        tmp_path / "cache", codebooks=[info], identity={"base_model": "t"}, vocab=list("abcd")
    ) as w:
        for d in range(4):
            label = "sport" if d % 2 == 0 else "business"
            toks = [0, 0, 0, 1] if label == "sport" else [1, 1, 2, 2]
            w.add_document(f"d{d}", "x", label)
            w.add_tokens(
                np.array(toks, np.int32), np.zeros((4, 2), np.int64), {info.name: np.zeros((4, 1))}
            )
        cache = w.finish()
    llr = token_topic_llr(cache, ["sport", "business"], alpha=0.5)
    assert llr.shape == (2, 4)
    sport = np.array([6, 2, 0, 0]) + 0.5  # token counts per topic + alpha
    business = np.array([0, 4, 4, 0]) + 0.5
    expected = np.log(sport / sport.sum()) - np.log(business / business.sum())
    np.testing.assert_allclose(llr[0], expected)
    np.testing.assert_allclose(llr[1], -expected)  # two topics: each is the other's "rest"
    assert llr[0, 0] > 0 > llr[0, 2] and abs(llr[0, 3]) < 1e-12  # unseen token: no evidence
    # Document counts: token 0 is in both sport docs and no business doc; token 1 in all 4.
    docs = token_topic_llr(cache, ["sport", "business"], alpha=0.5, count="documents")
    rate = lambda df, n: np.log((df + 0.5) / (n + 1.0))  # noqa: E731
    np.testing.assert_allclose(docs[0, 0], rate(2, 2) - rate(0, 2))
    np.testing.assert_allclose(docs[0, 1], 0.0, atol=1e-12)  # in every document: no evidence
    np.testing.assert_allclose(docs[0, 2], rate(0, 2) - rate(2, 2))


def test_code_effects_measure_what_a_forced_code_does() -> None:
    import torch
    import torch.nn.functional as F
    from conftest import tiny_model

    from codebook_lens import CodebookConfig, attach_codebooks
    from codebook_lens.codes.intervene import EditSpec, InterventionSpec, run_with_codes
    from codebook_lens.experiments.topics import TopicCode, code_effects

    model = attach_codebooks(
        tiny_model("gpt2"), CodebookConfig(num_codes=16, k=2, placements=["attn_heads"])
    ).eval()
    ids = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    codes = [
        TopicCode("layers.1.attn_heads", 2, 5, 1.0, 1.0, 1),
        TopicCode("layers.0.attn_heads", 0, 9, 0.8, 0.5, 2),
    ]
    llr = np.zeros(64)
    llr[7] = 1.0  # effect = change of the mean probability of token 7
    got = code_effects(model, None, codes, ids, llr, slot="append", scale=2.0)
    assert [(c.codebook, c.head, c.code, c.precision) for c in got] == [
        (c.codebook, c.head, c.code, c.precision) for c in codes
    ]
    assert all(c.effect is None for c in codes)  # copies, the inputs are left alone
    with torch.no_grad():
        with model.disabled():
            ref = F.log_softmax(model(input_ids=ids).logits, -1)
        p0 = F.softmax(model(input_ids=ids).logits, -1)
    for c, g in zip(codes, got, strict=True):
        edit = EditSpec(
            c.codebook, [c.code], positions="all", slot="append", scale=2.0, head=c.head
        )
        with torch.no_grad():
            p = F.softmax(run_with_codes(model, ids, InterventionSpec([edit])).logits, -1)
        assert g.effect == pytest.approx(float((p[..., 7] - p0[..., 7]).mean()), abs=1e-6)
        cost = -(p * ref).sum(-1).mean() + (p0 * ref).sum(-1).mean()
        assert g.cost == pytest.approx(float(cost), abs=1e-5)
        assert g.effect != 0.0
    # A constant llr carries no topic: every code's effect is 0 (probabilities sum to 1).
    flat = code_effects(model, None, codes, ids, np.full(64, 3.0), slot="append", scale=2.0)
    assert all(abs(c.effect) < 1e-5 for c in flat)  # type: ignore[arg-type]
    # A code the head never chooses, forced at scale 0 in an appended slot, adds nothing.
    used = set(model.get_codes(ids)["layers.1.attn_heads"][:, :, 2].reshape(-1).tolist())
    unused = next(c for c in range(16) if c not in used)
    idle = [TopicCode("layers.1.attn_heads", 2, unused, 1.0, 1.0, 1)]
    zero = code_effects(model, None, idle, ids, llr, slot="append", scale=0.0)
    assert abs(zero[0].effect) < 1e-6 and abs(zero[0].cost) < 1e-5  # type: ignore[arg-type]


def test_choose_setting_best_gain_within_the_perplexity_bound() -> None:
    from codebook_lens.experiments.topics import choose_setting

    pts = [
        {"codes": 8, "gain": 0.2, "perplexity_ratio": 1.1},
        {"codes": 16, "gain": 0.4, "perplexity_ratio": 1.4},
        {"codes": 32, "gain": 0.4, "perplexity_ratio": 1.2},
        {"codes": 64, "gain": 0.9, "perplexity_ratio": 2.0},
    ]
    assert choose_setting(pts, 1.5)["codes"] == 32  # equal gain: the more fluent one
    assert choose_setting(pts, 2.0)["codes"] == 64
    # Nothing qualifies: the most fluent point.
    assert choose_setting(pts[1:], 1.05)["codes"] == 32


def test_tuning_margin_chooses_below_the_target_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep qualifies settings by ``tune_perplexity_ratio``, not by the target's bound,
    and records per prompt what a check of the choice on other prompts needs."""
    import math

    import codebook_lens.experiments.topics.steering as steering
    from codebook_lens.codes.intervene import Generation
    from codebook_lens.experiments.topics import TopicsConfig
    from codebook_lens.experiments.topics.codes import TopicCode
    from codebook_lens.experiments.topics.model import TopicModels

    assert steering.per_prompt_hits(["a", "b", "b", None, "a", "a"], "a", 2) == [1, 0, 2]
    clf = TopicClassifier.fit(["stocks stocks", "film film"], ["business", "entertainment"])
    codes = [TopicCode("layers.0.attn_heads", 0, i, 1.0, 1.0, 20) for i in range(3)]
    pools = {"firing": {"business": codes, "entertainment": codes}}
    calls: list[int] = []

    def fake_sample(model, tok, ppl_model, spec, prompts, cfg, *, samples_per_prompt, per_prompt):  # type: ignore[no-untyped-def]
        # n forced codes write n business samples of 4 per prompt, at perplexity
        # exp(1 + 0.1 n): ratio exp(0.1 n) = 1.11x, 1.22x, 1.35x for 1, 2, 3 codes.
        n = 0 if spec is None else len(spec.edits[0].code_list)
        calls.append(n)
        texts = (["stocks"] * n + ["film"] * (4 - n)) * len(prompts)
        gens = [(i // 4, Generation(ids=[1], text=t)) for i, t in enumerate(texts)]
        per_prompt += [((1.0 + 0.1 * n) * 10, 10)] * len(prompts)
        return gens, (1.0 + 0.1 * n) * 10 * len(prompts), 10 * len(prompts)

    monkeypatch.setattr(steering, "sample_condition", fake_sample)
    for ratio, want in ((1.5, 3), (1.3, 2), (1.0, 1)):  # 1.0: none qualifies, the most fluent
        cfg = TopicsConfig(
            tune_codes=[1, 2, 3], tune_scales=[1.0], tune_perplexity_ratio=ratio,
            tune_prompts=["Last night", "So"], tune_samples_per_prompt=4, progress=False,
        )  # fmt: skip
        calls.clear()
        models = TopicModels(None, None, None, "fake")  # type: ignore[arg-type]
        setting, tuning = steering.tune_settings(cfg, models, clf, pools)
        assert calls[0] == 0 and len(calls) == 1 + 2 * 3  # unsteered first, then each point
        assert setting["business"] == {"ranking": "firing", "codes": want, "scale": 1.0}
        assert tuning is not None and tuning["perplexity_ratio"] == ratio
        chosen = tuning["topics"]["business"]["chosen"]
        assert chosen["perplexity_ratio"] == pytest.approx(math.exp(0.1 * want))
        assert chosen["gain"] == pytest.approx(want / 4)
        assert chosen["prompt_on_topic"] == [want, want]
        assert chosen["prompt_nll"] == [[pytest.approx(10 + want), 10]] * 2
        assert tuning["baseline_prompt_nll"] == [[10.0, 10]] * 2
        assert tuning["topics"]["business"]["baseline_prompt_on_topic"] == [0, 0]


def test_interleave_round_robins_labels() -> None:
    from codebook_lens.experiments.topics import interleave
    from codebook_lens.training.data import Document

    docs = [Document(f"{lab}{i}", "x", lab) for lab in ("a", "b") for i in range(3)]
    docs.append(Document("c0", "x", "c"))
    assert [d.id for d in interleave(docs)] == ["a0", "b0", "c0", "a1", "b1", "a2", "b2"]


def test_config_errors() -> None:
    from codebook_lens.experiments.topics import TopicsConfig

    with pytest.raises(ValueError, match="slot='first' is invalid"):
        TopicsConfig(slot="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_codes_per_head=9 is invalid"):
        TopicsConfig(max_codes_per_head=9, k=8, slot="replace-lowest")
    with pytest.raises(ValueError, match="codes_per_topic=0 is invalid"):
        TopicsConfig(codes_per_topic=0)
    with pytest.raises(ValueError, match="prompts=.* is invalid"):
        TopicsConfig(prompts=[" "])
    with pytest.raises(ValueError, match=r"tune_prompts=.* is invalid: \['The'\] are also"):
        TopicsConfig(prompts=["The", "A"], tune_prompts=["The", "So"])
    with pytest.raises(ValueError, match="tune_scales=.* is invalid; give numbers"):
        TopicsConfig(tune_scales=["big"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tune_codes=.* is invalid"):
        TopicsConfig(tune_codes=[0])
    with pytest.raises(ValueError, match="selection='both' is invalid without tune_codes"):
        TopicsConfig(selection="both", tune_codes=[])
    with pytest.raises(ValueError, match="selection='where' is invalid"):
        TopicsConfig(selection="where")  # type: ignore[arg-type]
    assert TopicsConfig(tune_scales=["1.5", 2]).tune_scales == [1.5, 2.0]  # type: ignore[list-item]
    # The tuning bound lies between 1 and the target's bound.
    with pytest.raises(ValueError, match=r"tune_perplexity_ratio=1.6 is invalid; .* <= 1.5"):
        TopicsConfig(tune_perplexity_ratio=1.6)
    with pytest.raises(ValueError, match=r"tune_perplexity_ratio=0.9 is invalid; .* >= 1.0"):
        TopicsConfig(tune_perplexity_ratio=0.9)
    relaxed = TopicsConfig(max_perplexity_ratio=2.0, tune_perplexity_ratio=1.6)
    assert relaxed.tune_perplexity_ratio == 1.6


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from codebook_lens.cli import main

    out = tmp_path / "topics"
    argv = ["experiment", "topics", "--quick", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "classifier held-out accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["classifier"]["heldout_accuracy"] <= 1.0
    topics = metrics["topics"]
    assert sorted(topics) == ["business", "entertainment", "politics", "sports", "tech"]
    for m in topics.values():
        assert 0.0 <= m["baseline_rate"] <= 1.0 and 0.0 <= m["steered_rate"] <= 1.0
        assert m["baseline_samples"] == 4  # 2 prompts x 2 samples
        assert m["samples"] in (0, 4)  # 0 when no code met the thresholds
    # The baseline counts are the judge's verdicts on the same 4 unsteered samples.
    assert (
        sum(metrics["baseline"]["predicted"].values()) + metrics["baseline"]["no_known_word"] == 4
    )
    for name in ("report.md", "report.html", "topics_chart.png", "generations.json"):
        assert (out / name).is_file(), name
    from codebook_lens.codes.intervene import InterventionSpec

    for topic, m in topics.items():
        if m["codes"]:  # the saved spec forces exactly the reported codes
            spec = InterventionSpec.load(out / "specs" / f"{topic}.yaml")
            forced = sorted((e.codebook, e.head, c) for e in spec.edits for c in e.code_list)
            assert forced == sorted((c["codebook"], c["head"], c["code"]) for c in m["codes"])
    report = (out / "report.md").read_text()
    assert "| topic | ranking | codes | scale | unsteered on-topic | steered on-topic |" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # A second run reuses the trained model instead of training again.
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["model"].endswith("(reused)")


@pytest.mark.slow
def test_quick_experiment_effect_selection_and_tuning(tmp_path: Path) -> None:
    import json

    from codebook_lens.cli import main

    out = tmp_path / "topics"
    argv = ["experiment", "topics", "--quick", "--out", str(out), "--no-progress"]
    argv += ["--selection", "both", "--tune-codes", "2,4", "--tune-scales", "1,2"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"] == "both"
    tuning = metrics["tuning"]
    assert tuning["prompts"] == metrics["tuning_prompts"]
    assert not set(metrics["tuning_prompts"]) & set(metrics["evaluation_prompts"])
    for t, m in metrics["topics"].items():
        if m["setting"]["ranking"] == "effect":
            # Effect ranking keeps only codes measured to raise the topic's words.
            assert all(c["effect"] is not None and c["effect"] > 0 for c in m["codes"])
        pts = tuning["topics"][t]["points"]
        if pts:  # the evaluated setting is the one chosen on the tuning prompts
            chosen = tuning["topics"][t]["chosen"]
            assert chosen in pts and {p["ranking"] for p in pts} <= {"firing", "effect"}
            assert len([p for p in pts if p["ranking"] == "firing"]) == 4  # 2 codes x 2 scales
            assert m["setting"] == {k: chosen[k] for k in ("ranking", "codes", "scale")}
            assert len(m["codes"]) == chosen["codes"]
    report = (out / "report.md").read_text()
    assert "Tuning prompts (code effects and the tuning sweep only): 'Last night'" in report
    assert (out / "topics_tradeoff.png").is_file()
