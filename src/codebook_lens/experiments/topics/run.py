"""Run the topic steering experiment end to end (``run_topics``)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codebook_lens.codes.intervene import Generation
from codebook_lens.config import write_json_atomic
from codebook_lens.experiments.topics.classifier import TopicClassifier
from codebook_lens.experiments.topics.codes import TopicCode, topic_code_pools
from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.experiments.topics.corpus import Splits, split_corpus
from codebook_lens.experiments.topics.model import TopicModels, prepare_model_and_cache
from codebook_lens.experiments.topics.report import write_topics_report
from codebook_lens.experiments.topics.steering import (
    Setting,
    evaluate_conditions,
    tune_settings,
)

Generations = dict[str | None, list[tuple[int, Generation]]]
"""Condition (``None`` = unsteered, else the steered topic) -> ``(prompt index, sample)``."""


def run_topics(cfg: TopicsConfig) -> dict[str, Any]:
    """Run the whole experiment; writes the report, returns ``metrics.json``'s content."""
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data and the judge (trained on documents the LM never sees).
    splits = split_corpus(cfg)
    clf, judge = fit_judge(cfg, splits, out)
    topics = clf.labels

    # 2. Model, code cache, topic codes.
    model, tokenizer, base, model_source, cache = prepare_model_and_cache(cfg, splits.lm, out)
    models = TopicModels(model, tokenizer, base, model_source)
    pools = topic_code_pools(cfg, models, cache, topics)

    # 3a. Tuning sweep on the tuning prompts only: gain and perplexity per (codes, scale).
    setting, tuning = tune_settings(cfg, models, clf, pools)
    topic_codes = {
        t: pools[str(setting[t]["ranking"])][t][: int(setting[t]["codes"])] for t in topics
    }

    # 3b. Evaluation prompts (never used above): without and with steering, paired seeds.
    gens, nll = evaluate_conditions(cfg, models, topic_codes, setting, out)

    # 4. Judge.
    metrics: dict[str, Any] = {
        "classifier": judge,
        "model": model_source,
        "lm_docs": len(splits.lm),
        "cache_tokens": cache.n_tokens,
        **judge_generations(clf, gens, nll, setting, topic_codes),
    }
    metrics.update(targets(cfg, metrics["topics"]))
    metrics["selection"] = cfg.selection
    metrics["evaluation_prompts"] = list(cfg.prompts)
    metrics["tuning_prompts"] = list(cfg.tune_prompts)
    metrics["tuning"] = tuning
    metrics["config"] = asdict(cfg)
    metrics["seconds"] = time.perf_counter() - started
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(
        out / "generations.json",
        {str(c): [{"prompt": cfg.prompts[pi], "text": g.text} for pi, g in gens[c]] for c in gens},
    )
    write_topics_report(cfg, metrics, clf, gens, out)
    return metrics


def fit_judge(
    cfg: TopicsConfig, splits: Splits, out: Path
) -> tuple[TopicClassifier, dict[str, Any]]:
    """Train the topic classifier on ``splits.classifier_train``, save it to
    ``out/classifier``, and measure it on ``splits.classifier_test`` (whole articles and their
    openings): the classifier and its ``metrics.json`` entry."""
    clf = TopicClassifier.fit(
        [d.text for d in splits.classifier_train], [str(d.label) for d in splits.classifier_train]
    )
    clf.save(out / "classifier")
    test_texts = [d.text for d in splits.classifier_test]
    test_labels = [str(d.label) for d in splits.classifier_test]
    heldout_acc = clf.accuracy(test_texts, test_labels)
    # Generations are short: also measure the judge on article openings of similar length.
    snippet_words = max(8, cfg.max_new_tokens * 3 // 4)
    snippets = [" ".join(t.split()[:snippet_words]) for t in test_texts]
    snippet_acc = clf.accuracy(snippets, test_labels)
    return clf, {
        "kind": "multinomial naive Bayes on lower-cased words, uniform prior",
        "heldout_accuracy": heldout_acc,
        "snippet_accuracy": snippet_acc,
        "snippet_words": snippet_words,
        "train_docs": len(splits.classifier_train),
        "test_docs": len(splits.classifier_test),
    }


def judge_generations(
    clf: TopicClassifier,
    gens: Generations,
    nll: Mapping[str | None, Sequence[float]],
    setting: Mapping[str, Setting],
    topic_codes: Mapping[str, Sequence[TopicCode]],
) -> dict[str, Any]:
    """``metrics.json``'s ``baseline`` and ``topics`` entries: the judge's verdicts on the
    unsteered and the steered samples, and their perplexities."""
    topics = clf.labels

    def texts(cond: str | None) -> list[str]:
        return [g.text or "" for _, g in gens[cond]]

    baseline_pred = clf.predict(texts(None))

    def ppl(cond: str | None) -> float | None:
        s, n = nll[cond]
        return math.exp(s / n) if n else None

    baseline = {
        "samples": len(baseline_pred),
        "perplexity": ppl(None),
        "predicted": {t: baseline_pred.count(t) for t in topics},
        "no_known_word": baseline_pred.count(None),
    }
    per_topic = {}
    for t in topics:
        pred = clf.predict(texts(t))
        steered = sum(p == t for p in pred) / len(pred) if pred else 0.0
        base_rate = sum(p == t for p in baseline_pred) / len(baseline_pred)
        per_topic[t] = {
            "baseline_rate": base_rate,
            "steered_rate": steered,
            "gain": steered - base_rate,
            "samples": len(pred),
            "baseline_samples": len(baseline_pred),
            "steered_perplexity": ppl(t),
            "perplexity_ratio": ratio(ppl(t), ppl(None)),
            "setting": setting[t],
            "codes": [asdict(c) for c in topic_codes[t]],
        }
    return {"baseline": baseline, "topics": per_topic}


def targets(cfg: TopicsConfig, per_topic: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``metrics.json``'s ``target`` (>= +30 points for >= 3 topics) and
    ``target_every_topic`` (every topic >= +30 points within the perplexity bound)."""
    gains = [m["gain"] for m in per_topic.values()]
    ratios = [m["perplexity_ratio"] for m in per_topic.values()]
    fluent = sum(r is not None and r <= cfg.max_perplexity_ratio for r in ratios)
    return {
        "target": {
            "topics_with_gain_ge_30pts": sum(g >= 0.30 for g in gains),
            "needed": 3,
            "met": sum(g >= 0.30 for g in gains) >= 3,
        },
        "target_every_topic": {
            "topics": len(per_topic),
            "topics_with_gain_ge_30pts": sum(g >= 0.30 for g in gains),
            "topics_within_perplexity_ratio": fluent,
            "max_perplexity_ratio": cfg.max_perplexity_ratio,
            "met": all(g >= 0.30 for g in gains) and fluent == len(per_topic),
        },
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None
