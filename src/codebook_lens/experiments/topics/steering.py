"""Steering: force a topic's codes at every position; choose per topic how many and at what
scale on the tuning prompts; then sample the evaluation prompts with and without them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from codebook_lens.codes.intervene import EditSpec, Generation, InterventionSpec
from codebook_lens.experiments.topics.classifier import TopicClassifier
from codebook_lens.experiments.topics.codes import TopicCode
from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.experiments.topics.model import TopicModels
from codebook_lens.experiments.topics.sampling import sample_condition

Setting = dict[str, Any]
"""How one topic is steered: ``{"ranking": str, "codes": int, "scale": float}``."""
TuneRun = Callable[
    [InterventionSpec | None], tuple[list[str], float | None, list[tuple[float, int]]]
]
"""Samples the tuning prompts under a spec: their texts (prompt by prompt), perplexity, and
each prompt's ``(summed NLL, tokens)``."""


def steering_spec(
    codes: Sequence[TopicCode], *, slot: str = "replace-lowest", scale: float = 1.0
) -> InterventionSpec:
    """Force ``codes`` at every position: one edit per (codebook, head)."""
    groups: dict[tuple[str, int | None], list[int]] = {}
    for c in codes:
        groups.setdefault((c.codebook, c.head), []).append(c.code)
    return InterventionSpec(
        [
            EditSpec(cb, ids, positions="all", action="force", slot=slot, scale=scale, head=h)  # type: ignore[arg-type]
            for (cb, h), ids in groups.items()
        ]
    )


def choose_setting(points: Sequence[Mapping[str, Any]], max_ratio: float) -> Mapping[str, Any]:
    """The tuning point with the best gain among those whose perplexity ratio is at most
    ``max_ratio`` (ties: lower ratio); the lowest-ratio point when none qualifies."""
    ok = [p for p in points if p["perplexity_ratio"] <= max_ratio]
    if not ok:
        return min(points, key=lambda p: p["perplexity_ratio"])
    return max(ok, key=lambda p: (p["gain"], -p["perplexity_ratio"]))


def tune_settings(
    cfg: TopicsConfig,
    models: TopicModels,
    clf: TopicClassifier,
    pools: Mapping[str, Mapping[str, Sequence[TopicCode]]],
) -> tuple[dict[str, Setting], dict[str, Any] | None]:
    """Each topic's setting and the tuning sweep's record (``None`` without ``cfg.tune_codes``:
    then every topic gets the first ranking, ``cfg.codes_per_topic`` codes, ``cfg.scale``).

    The sweep samples only the tuning prompts: gain and perplexity per (ranking, number of
    codes, scale); the setting chosen is ``choose_setting``'s with
    ``cfg.tune_perplexity_ratio`` (a margin under the target bound ``cfg.max_perplexity_ratio``,
    so that the bound also holds on prompts the choice never saw). Every point also records
    per prompt its on-topic samples and ``[summed NLL, tokens]``, so a choice can be checked
    on prompts it did not use.
    """
    topics = clf.labels
    first = next(iter(pools))
    setting: dict[str, Setting] = {
        t: {"ranking": first, "codes": cfg.codes_per_topic, "scale": cfg.scale} for t in topics
    }
    if not cfg.tune_codes:
        return setting, None
    scales = cfg.tune_scales or [cfg.scale]
    bar = tqdm(
        total=(1 + len(topics) * len(pools) * len(cfg.tune_codes) * len(scales))
        * len(cfg.tune_prompts),
        desc="tune",
        disable=not cfg.progress,
    )

    def tune_run(
        spec: InterventionSpec | None,
    ) -> tuple[list[str], float | None, list[tuple[float, int]]]:
        per_prompt: list[tuple[float, int]] = []
        g, s_, n_ = sample_condition(
            models.model,
            models.tokenizer,
            models.base,
            spec,
            cfg.tune_prompts,
            cfg,
            samples_per_prompt=cfg.tune_samples_per_prompt,
            per_prompt=per_prompt,
        )
        bar.update(len(cfg.tune_prompts))
        return [x.text or "" for _, x in g], (math.exp(s_ / n_) if n_ else None), per_prompt

    base_texts, base_ppl, base_nll = tune_run(None)
    base_pred = clf.predict(base_texts)
    tuning: dict[str, Any] = {
        "prompts": list(cfg.tune_prompts),
        "samples_per_prompt": cfg.tune_samples_per_prompt,
        "perplexity_ratio": cfg.tune_perplexity_ratio,
        "baseline_perplexity": base_ppl,
        "baseline_prompt_nll": [list(x) for x in base_nll],
        "topics": {},
    }
    for t in topics:
        rate0 = sum(p == t for p in base_pred) / len(base_pred)
        points = tune_points(cfg, t, pools, scales, tune_run, clf, rate0, base_ppl, bar)
        chosen = choose_setting(points, cfg.tune_perplexity_ratio) if points else None
        tuning["topics"][t] = {
            "baseline_rate": rate0,
            "baseline_prompt_on_topic": per_prompt_hits(base_pred, t, cfg.tune_samples_per_prompt),
            "points": points,
            "chosen": chosen,
        }
        if chosen is not None:
            setting[t] = {
                "ranking": str(chosen["ranking"]),
                "codes": int(chosen["codes"]),
                "scale": float(chosen["scale"]),
            }
    bar.close()
    return setting, tuning


def tune_points(
    cfg: TopicsConfig,
    topic: str,
    pools: Mapping[str, Mapping[str, Sequence[TopicCode]]],
    scales: Sequence[float],
    run: TuneRun,
    clf: TopicClassifier,
    rate0: float,
    base_ppl: float | None,
    bar: Any,
) -> list[dict[str, Any]]:
    """The sweep's points for ``topic``: on-topic rate, gain over ``rate0`` and perplexity for
    each ranking x ``cfg.tune_codes`` x ``scales`` (none for a ranking without codes)."""
    points = []
    for r, pool in pools.items():
        for n_codes in cfg.tune_codes:
            for sc in scales:
                if not pool[topic]:
                    bar.update(len(cfg.tune_prompts))
                    continue
                spec = steering_spec(pool[topic][:n_codes], slot=cfg.slot, scale=sc)
                texts_t, p, nll = run(spec)
                pred = clf.predict(texts_t)
                rate = sum(x == topic for x in pred) / len(pred)
                points.append(
                    {
                        "ranking": r,
                        "codes": min(n_codes, len(pool[topic])),
                        "scale": sc,
                        "steered_rate": rate,
                        "gain": rate - rate0,
                        "perplexity": p,
                        "perplexity_ratio": (p / base_ppl) if p and base_ppl else math.inf,
                        "prompt_on_topic": per_prompt_hits(
                            pred, topic, cfg.tune_samples_per_prompt
                        ),
                        "prompt_nll": [list(x) for x in nll],
                    }
                )
    return points


def per_prompt_hits(pred: Sequence[str | None], topic: str, per_prompt: int) -> list[int]:
    """How many of each prompt's ``per_prompt`` consecutive verdicts in ``pred`` are
    ``topic``."""
    return [
        sum(p == topic for p in pred[i : i + per_prompt]) for i in range(0, len(pred), per_prompt)
    ]


def evaluate_conditions(
    cfg: TopicsConfig,
    models: TopicModels,
    topic_codes: Mapping[str, Sequence[TopicCode]],
    setting: Mapping[str, Setting],
    out: Path,
) -> tuple[dict[str | None, list[tuple[int, Generation]]], dict[str | None, list[float]]]:
    """Sample the evaluation prompts unsteered (condition ``None``) and steered to each topic
    (paired seeds): per condition the ``(prompt index, generation)`` pairs and ``[summed NLL,
    tokens]``. A topic without codes is not sampled. Each topic's spec is saved to
    ``out/specs/<topic>.yaml`` so the steering replays from the shell."""
    conditions: list[str | None] = [None, *topic_codes]
    gens: dict[str | None, list[tuple[int, Generation]]] = {c: [] for c in conditions}
    nll: dict[str | None, list[float]] = {c: [0.0, 0.0] for c in conditions}
    bar = tqdm(total=len(conditions), desc="generate", disable=not cfg.progress)
    for cond in conditions:
        spec: InterventionSpec | None = None
        if cond is not None:
            if not topic_codes[cond]:
                bar.update(1)
                continue
            spec = steering_spec(topic_codes[cond], slot=cfg.slot, scale=setting[cond]["scale"])
            # Saved so the steering replays from the shell: codebook-lens generate ... --intervene
            (out / "specs").mkdir(exist_ok=True)
            spec.save(out / "specs" / f"{cond}.yaml")
        g, s_, n_ = sample_condition(
            models.model,
            models.tokenizer,
            models.base,
            spec,
            cfg.prompts,
            cfg,
            samples_per_prompt=cfg.samples_per_prompt,
        )
        gens[cond] = g
        nll[cond] = [s_, float(n_)]
        bar.update(1)
    bar.close()
    return gens, nll
