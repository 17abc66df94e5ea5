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
    from codebook_lens.cache import CacheWriter, CodebookInfo

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


def test_interleave_round_robins_labels() -> None:
    from codebook_lens.data import Document
    from codebook_lens.experiments.topics import interleave

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
    from codebook_lens.intervene import InterventionSpec

    for topic, m in topics.items():
        if m["codes"]:  # the saved spec forces exactly the reported codes
            spec = InterventionSpec.load(out / "specs" / f"{topic}.yaml")
            forced = sorted((e.codebook, e.head, c) for e in spec.edits for c in e.code_list)
            assert forced == sorted((c["codebook"], c["head"], c["code"]) for c in m["codes"])
    report = (out / "report.md").read_text()
    assert "| topic | codes | unsteered on-topic | steered on-topic |" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # A second run reuses the trained model instead of training again.
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["model"].endswith("(reused)")
