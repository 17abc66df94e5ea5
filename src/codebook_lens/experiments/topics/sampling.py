"""Sampling from neutral prompts, paired by seed across conditions, and the fluency measure
(the negative log-likelihood of what was generated)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codebook_lens.codes.intervene import Generation, InterventionSpec, generate
from codebook_lens.experiments.topics.config import TopicsConfig
from codebook_lens.model.codebook_model import CodebookModel
from codebook_lens.model.tokenizer import separator_id


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """End-of-text token (a document starts) followed by the prompt's tokens."""
    return [separator_id(tokenizer), *tokenizer.encode(prompt, add_special_tokens=False)]


def sample_prompts(
    model: CodebookModel,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: InterventionSpec | None,
    *,
    num_samples: int,
    seed: int,
    max_new_tokens: int | None = None,
    length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
) -> Iterator[tuple[int, list[int], list[Generation]]]:
    """For each prompt in turn: its index, its ids (``prompt_ids``) and ``num_samples``
    samples under ``spec``, drawn with seed ``seed`` + the index (the same seed pairs the
    samples of two conditions). Give ``max_new_tokens``, or ``length``: prompt plus sample
    at most that many tokens (at least one new)."""
    if (max_new_tokens is None) == (length is None):
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r}, length={length!r}: give exactly one of them"
        )
    for pi, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        new = max(1, length - len(ids)) if length is not None else max_new_tokens
        assert new is not None
        samples = generate(
            model,
            tokenizer,
            ids,
            spec,
            max_new_tokens=new,
            temperature=temperature,
            top_k=top_k,
            num_samples=num_samples,
            seed=seed + pi,
            stop_at_eos=stop_at_eos,
        )
        yield pi, ids, samples


def generation_nll(
    model: nn.Module, prefix: list[int], gens: Sequence[Generation], device: torch.device
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the generated tokens given ``prefix``, and
    how many tokens that is, under ``model`` (a plain LM or a codebook model)."""
    rows = [g.ids for g in gens if g.ids]
    if not rows:
        return 0.0, 0
    width = len(prefix) + max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)  # tokens to score
    for i, r in enumerate(rows):
        seq = prefix + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(prefix) : len(seq)] = True
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        # Right padding never reaches a scored token in a causal model.
        logits = model(input_ids=ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:]
    return float(nll[m].sum()), int(m.sum())


def sample_condition(
    model: CodebookModel,
    tokenizer: Any,
    ppl_model: nn.Module | None,
    spec: InterventionSpec | None,
    prompts: Sequence[str],
    cfg: TopicsConfig,
    *,
    samples_per_prompt: int,
    per_prompt: list[tuple[float, int]] | None = None,
) -> tuple[list[tuple[int, Generation]], float, int]:
    """Samples from every prompt under ``spec`` (seed ``cfg.seed`` + prompt index, so the
    conditions are paired), with the summed NLL of the generated tokens and their number under
    ``ppl_model`` (``None``: the codebook model with its codebooks off). When ``per_prompt``
    is given, each prompt's ``(summed NLL, tokens)`` is appended to it in prompt order."""
    device = next(model.parameters()).device
    gens: list[tuple[int, Generation]] = []
    total, count = 0.0, 0
    for pi, ids, samples in sample_prompts(
        model,
        tokenizer,
        prompts,
        spec,
        num_samples=samples_per_prompt,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
    ):
        gens += [(pi, g) for g in samples]
        if ppl_model is None:
            with model.disabled():
                s, n = generation_nll(model, ids, samples, device)
        else:
            s, n = generation_nll(ppl_model, ids, samples, device)
        if per_prompt is not None:
            per_prompt.append((s, n))
        total += s
        count += n
    return gens, total, count


def steering_contexts(
    model: CodebookModel,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    length: int,
    seed: int,
) -> torch.Tensor:
    """``(n, length)`` token ids: unsteered samples from ``prompts`` (after the end-of-text
    token), cut to ``length``; the teacher-forced contexts on which ``code_effects`` measures
    what a forced code does to the next-token distribution."""
    rows = []
    for _, ids, gens in sample_prompts(
        model,
        tokenizer,
        prompts,
        None,
        num_samples=per_prompt,
        seed=seed + 1000,
        length=length,
        top_k=50,
        stop_at_eos=False,
    ):
        rows += [(ids + g.ids)[:length] for g in gens]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows], dtype=torch.long)
