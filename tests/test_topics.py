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
