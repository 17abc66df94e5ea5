"""Running a model under an intervention: one forward pass, sampling, and ablation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from codebook_lens.codes.intervene.edits import intervene
from codebook_lens.codes.intervene.spec import InterventionSpec
from codebook_lens.config import check_range
from codebook_lens.flags import flag
from codebook_lens.model.codebook_model import CodebookModel, eval_mode
from codebook_lens.model.kv_cache import cache_kwargs, output_cache


@dataclass
class Sampling:
    """How ``generate`` draws continuations (the ``generate`` command's sampling flags)."""

    num_samples: int = field(default=5, metadata=flag(name="--n"))
    """Samples per column."""
    max_new_tokens: int = 40
    """Tokens generated per sample."""
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int | None = None
    """Sample from the k likeliest tokens."""
    top_p: float | None = None
    """Nucleus sampling mass."""
    seed: int = 0
    """Seed of the draws (the same seed pairs samples with and without a spec)."""


class RunResult(NamedTuple):
    """Result of ``run_with_codes``."""

    logits: Tensor
    """``(batch, seq, vocab)``."""
    codes: dict[str, Tensor]
    """``name -> (batch, seq, [heads,] k')`` code ids actually used (after the edits)."""


def _as_ids(input_ids: Tensor | Sequence[int], device: torch.device) -> Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[-1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(ids.shape)} are invalid; give (seq,) or (batch, seq) "
            "with seq >= 1"
        )
    return ids


@torch.no_grad()
def run_with_codes(
    model: CodebookModel,
    input_ids: Tensor | Sequence[int],
    spec: InterventionSpec | None = None,
    *,
    prompt_length: int | None = None,
    **forward_kwargs: Any,
) -> RunResult:
    """One forward pass with ``spec`` applied; returns logits and the codes used.

    ``prompt_length`` (default: the whole input) splits 'prompt' from 'generated' positions.
    """
    ids = _as_ids(input_ids, _device(model))
    seq = ids.shape[-1]
    prompt_length = seq if prompt_length is None else prompt_length
    if not 1 <= prompt_length <= seq:
        raise ValueError(f"prompt_length={prompt_length} is invalid; it must be in 1 .. {seq}")
    with (
        intervene(model, spec, prompt_length=prompt_length, length=seq),
        model.record_codes() as rec,
    ):
        out = model(input_ids=ids, **forward_kwargs)
    return RunResult(out.logits, rec.codes)


class Generation(NamedTuple):
    """One sampled continuation."""

    ids: list[int]
    """New token ids (without the prompt; stops before the end-of-sequence token)."""
    text: str | None
    """The new tokens decoded (``None`` without a tokenizer)."""


def _device(model: CodebookModel) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: CodebookModel) -> int | None:
    get = getattr(model.base, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, torch.nn.Embedding) else None


def _context_length(model: CodebookModel) -> int | None:
    """Longest sequence the model can take (learned positions), or None if unbounded/unknown."""
    cfg = getattr(model.base, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: CodebookModel, tokenizer: Any) -> set[int]:
    eos: Any = getattr(getattr(model.base, "config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | Tensor) -> list[int]:
    """Token ids of a prompt given as text (needs ``tokenizer``) or ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is text but tokenizer=None; pass a tokenizer or token ids")
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
            ids = [int(tokenizer.bos_token_id)]
    else:
        ids = [int(i) for i in torch.as_tensor(prompt).reshape(-1).tolist()]
    if not ids:
        raise ValueError(f"prompt={prompt!r} is invalid; it encodes to no tokens")
    return ids


def _sampling_probs(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """Next-token probabilities ``(batch, vocab)`` from logits, tempered, top-k and nucleus
    filtered. The most likely token always keeps a share, so no ``top_p`` in (0, 1] and no
    ``temperature > 0`` leaves a row without candidates (or with NaNs)."""
    scaled = logits / temperature
    # A temperature so small that the division overflows: shift the best logit to 0 first
    # (the same distribution), dividing by no less than the smallest normal float.
    tiny = torch.finfo(logits.dtype).tiny
    shifted = (logits - logits.amax(-1, keepdim=True)) / max(temperature, tiny)
    scaled = torch.where(scaled.amax(-1, keepdim=True).isfinite(), scaled, shifted)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; never the best one
        # (a top_p below the dtype's resolution would otherwise drop every token).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scaled.softmax(-1)


def _check_sampling(
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    """Raise ``ValueError`` naming the first invalid sampling option."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r} is invalid; it must be an integer >= 1"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; it must be an integer >= 1")
    check_range("temperature", temperature, 0.0)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid; it must be an integer >= 1 or None")
    if top_p is not None:
        check_range("top_p", top_p, 0.0, 1.0, low_open=True)


def _check_prompt(model: CodebookModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Raise unless the prompt's ids are in the vocabulary and the whole run fits the context."""
    vocab = _vocab_size(model)
    if vocab is not None and not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(
            f"prompt token ids {prompt_ids} are invalid; ids must be in 0 .. {vocab - 1}"
        )
    plen = len(prompt_ids)
    context = _context_length(model)
    if context is not None and plen + max_new_tokens > context:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is invalid for a {plen}-token prompt: the model's "
            f"context is {context} tokens, so it must be <= {max(context - plen, 0)}"
        )


@torch.no_grad()
def generate(
    model: CodebookModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | Tensor,
    spec: InterventionSpec | None = None,
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[Generation]:
    """Sample ``num_samples`` continuations of ``prompt`` with ``spec`` applied.

    A plain sampling loop over the KV cache (``temperature=0`` is greedy). The same ``seed``
    gives the same random draws with and without a spec, so samples pair up for comparison.
    """
    _check_sampling(max_new_tokens, num_samples, temperature, top_k, top_p)
    device = _device(model)
    prompt_ids = encode_prompt(tokenizer, prompt)
    _check_prompt(model, prompt_ids, max_new_tokens)
    plen = len(prompt_ids)
    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    new = torch.empty(num_samples, 0, dtype=torch.long, device=device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    with (
        eval_mode(model),  # each module's own mode comes back afterwards
        intervene(model, spec, prompt_length=plen, length=plen + max_new_tokens - 1),
    ):
        past: Any = None
        step_ids = ids
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, **cache_kwargs(model, past))
            past = output_cache(out)
            logits = out.logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = _sampling_probs(logits, temperature, top_k, top_p)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            new = torch.cat([new, nxt[:, None]], dim=1)
            if eos:
                done |= torch.isin(nxt, eos_t)
                if bool(done.all()):
                    break
            step_ids = nxt[:, None]
    return [_decoded(row, eos, tokenizer) for row in new.tolist()]


def _decoded(row: list[int], eos: set[int], tokenizer: Any) -> Generation:
    """One sample's new ids up to (not including) its first end-of-sequence token."""
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    row = row[:cut]
    text = None if tokenizer is None else tokenizer.decode(row, skip_special_tokens=True)
    return Generation(row, text)


class Ablation(NamedTuple):
    """Result of ``ablate``: next-token loss on the chosen tokens without and with the spec."""

    loss_before: float
    """Mean cross-entropy (nats) of the chosen tokens, unedited."""
    loss_after: float
    """The same with the spec applied."""
    delta: float
    """``loss_after - loss_before``."""
    tokens: int
    """Number of chosen tokens."""
    token_delta: Tensor
    """``(batch, seq)`` per-token loss change; NaN where not chosen (and at position 0)."""


@torch.no_grad()
def ablate(
    model: CodebookModel,
    input_ids: Tensor | Sequence[int],
    spec: InterventionSpec,
    target_mask: Tensor | None = None,
) -> Ablation:
    """Loss change on chosen tokens when ``spec`` is applied (e.g. codes banned).

    ``target_mask`` ``(batch, seq)`` bool marks the tokens whose prediction is scored (the
    loss of predicting token ``t`` from tokens ``< t``); position 0 has no prediction and is
    ignored. ``None`` scores every token from position 1 on.
    """
    ids = _as_ids(input_ids, _device(model))
    if ids.shape[-1] < 2:
        raise ValueError("input_ids need at least 2 tokens to measure a next-token loss")
    if target_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(target_mask, device=ids.device)
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(
                f"target_mask has shape {tuple(mask.shape)}; it must match input_ids "
                f"{tuple(ids.shape)}"
            )
        mask = mask.bool()
    mask = mask.clone()
    mask[:, 0] = False
    if not bool(mask.any()):
        raise ValueError("target_mask chooses no token after position 0; nothing to score")

    def token_loss(s: InterventionSpec | None) -> Tensor:
        logits = run_with_codes(model, ids, s).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return F.pad(ce, (1, 0), value=float("nan"))  # (batch, seq), NaN at position 0

    before, after = token_loss(None), token_loss(spec)
    lb, la = float(before[mask].mean()), float(after[mask].mean())
    delta = torch.where(mask, after - before, torch.full_like(after, float("nan")))
    return Ablation(lb, la, la - lb, int(mask.sum()), delta)
