"""Held-out evaluation: the base model and the codebook model on the same tokens.

``evaluate(model, batches)`` returns a nested JSON-ready dict::

    {"tokens": 12345,
     "base":     {"loss": 3.21, "perplexity": 24.8, "accuracy": 0.35},
     "codebook": {"loss": 3.30, "perplexity": 27.1, "accuracy": 0.34,
                  "mse": 0.012, "dead_fraction": 0.05},          # means over codebooks
     "loss_increase": 0.09, "loss_ratio": 1.028,
     "codebooks": {"layers.0.attn_heads": {"mse": ..., "dead_fraction": ..., "entropy": ...,
                                           "perplexity": ..., "num_codes": ..., "groups": ...}}}

For a plain model (no codebooks) only ``tokens`` and ``base`` are present. ``flatten_metrics``
gives dotted keys (``codebooks.layers.0.attn_heads.mse``); ``format_table`` a text table.
Evaluation leaves the codebooks' running statistics exactly as it found them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from codebook_lens.model.codebook_model import CodebookModel, eval_mode


class _Totals:
    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.count = 0

    @torch.no_grad()
    def add(self, logits: Tensor, ids: Tensor) -> None:
        pred = logits[:, :-1].float()
        target = ids[:, 1:]
        self.loss += float(
            F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
        )
        self.correct += int((pred.argmax(-1) == target).sum())
        self.count += target.numel()

    def summary(self) -> dict[str, float]:
        loss = self.loss / max(self.count, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": self.correct / max(self.count, 1),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    max_batches: int | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and next-token accuracy of the base and codebook model on ``batches``
    (``(batch, seq)`` input ids), plus per-codebook reconstruction MSE, dead-code fraction and
    usage entropy measured on the same tokens. See the module docstring for the layout."""
    device = next(model.parameters()).device
    cb = model if isinstance(model, CodebookModel) else None
    # eval_mode: a frozen base kept in eval mode stays there.
    with eval_mode(model), _stats_kept(cb):
        base, quant = _Totals(), _Totals()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        n = 0
        for ids in tqdm(batches, desc="eval", disable=not progress, total=max_batches):
            if max_batches is not None and n >= max_batches:
                break
            n += 1
            ids = ids.to(device)
            if ids.dim() != 2 or ids.shape[1] < 2:
                raise ValueError(
                    f"evaluation batches must be (batch, seq>=2), got {tuple(ids.shape)}"
                )
            with autocast:
                if cb is not None:
                    with cb.disabled():
                        base.add(cb(input_ids=ids).logits, ids)
                    quant.add(cb(input_ids=ids).logits, ids)
                else:
                    base.add(model(input_ids=ids).logits, ids)
        if n == 0:
            raise ValueError("no evaluation batches: the held-out split is empty")
        result: dict[str, Any] = {"tokens": base.count, "base": base.summary()}
        if cb is not None:
            result.update(_codebook_metrics(cb, result["base"]["loss"], quant))
    return result


@contextlib.contextmanager
def _stats_kept(model: CodebookModel | None) -> Iterator[None]:
    """Inside the block the codebooks count from zero; afterwards their statistics are back."""
    if model is None:
        yield
        return
    saved = {
        name: (layer.counts.clone(), layer.tokens_seen.clone(), layer.mse_sum.clone())
        for name, layer in model.codebooks.items()
    }
    model.reset_stats()
    try:
        yield
    finally:
        for name, layer in model.codebooks.items():
            counts, tokens_seen, mse_sum = saved[name]
            layer.counts.copy_(counts)
            layer.tokens_seen.copy_(tokens_seen)
            layer.mse_sum.copy_(mse_sum)


def _codebook_metrics(model: CodebookModel, base_loss: float, quant: _Totals) -> dict[str, Any]:
    """The ``codebook``, ``loss_increase``, ``loss_ratio`` and ``codebooks`` entries."""
    books: dict[str, dict[str, float]] = {}
    for name, layer in model.codebooks.items():
        st = layer.stats()
        books[name] = {
            "mse": st.mse,
            "dead_fraction": float((st.counts == 0).double().mean()),
            "entropy": st.entropy,
            "perplexity": st.perplexity,
            "num_codes": layer.num_codes,
            "groups": layer.groups,
        }
    q = quant.summary()
    q["mse"] = sum(b["mse"] for b in books.values()) / max(len(books), 1)
    q["dead_fraction"] = sum(b["dead_fraction"] for b in books.values()) / max(len(books), 1)
    return {
        "codebook": q,
        "loss_increase": q["loss"] - base_loss,
        "loss_ratio": q["loss"] / max(base_loss, 1e-12),
        "codebooks": books,
    }


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys: ``{"base": {"loss": 1}}`` -> ``{"base.loss": 1}``."""
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, key + "."))
        else:
            flat[key] = v
    return flat


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of an ``evaluate`` result."""
    lines = [f"{'model':<12} {'loss':>8} {'ppl':>10} {'accuracy':>9}"]
    for part in ("base", "codebook"):
        if part in metrics:
            m = metrics[part]
            lines.append(
                f"{part:<12} {m['loss']:>8.4f} {m['perplexity']:>10.2f} {m['accuracy']:>9.4f}"
            )
    if "loss_increase" in metrics:
        lines.append(
            f"loss increase from codebooks: {metrics['loss_increase']:+.4f} "
            f"({(metrics['loss_ratio'] - 1) * 100:+.1f}%) on {metrics['tokens']} tokens"
        )
    else:
        lines.append(f"on {metrics['tokens']} tokens")
    books = metrics.get("codebooks", {})
    if books:
        width = max(len("codebook"), *(len(n) for n in books))
        lines.append("")
        lines.append(
            f"{'codebook':<{width}} {'mse':>10} {'dead':>7} {'entropy':>8} {'ppl':>9} {'codes':>6}"
        )
        for name, b in books.items():
            lines.append(
                f"{name:<{width}} {b['mse']:>10.5f} {b['dead_fraction']:>7.3f} "
                f"{b['entropy']:>8.3f} {b['perplexity']:>9.1f} {b['num_codes']:>6d}"
            )
    return "\n".join(lines)
