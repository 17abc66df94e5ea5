"""Evaluation: hand-checked loss/accuracy, codebooks off equals base, statistics untouched."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.training.data import fixed_batches
from codebook_lens.training.evaluate import evaluate, flatten_metrics, format_table

IDS = torch.randint(1, 64, (6, 12), generator=torch.Generator().manual_seed(2))
BATCHES = fixed_batches(IDS, 4)  # batches of 4 and 2 rows


def reference(model: torch.nn.Module) -> tuple[float, float]:
    """Mean next-token loss and accuracy over IDS, computed in one go."""
    with torch.no_grad():
        logits = model(input_ids=IDS).logits[:, :-1]
    target = IDS[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, 64), target.reshape(-1)).item()
    acc = (logits.argmax(-1) == target).float().mean().item()
    return loss, acc


def test_plain_model_matches_hand_computation(arch: str) -> None:
    model = tiny_model(arch)
    out = evaluate(model, BATCHES)
    loss, acc = reference(model)
    assert out["tokens"] == 6 * 11
    assert out["base"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["base"]["accuracy"] == pytest.approx(acc)
    assert out["base"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert set(out) == {"tokens", "base"}


def test_codebooks_off_equals_base(arch: str) -> None:
    base_only = evaluate(tiny_model(arch), BATCHES)
    model = attach_codebooks(tiny_model(arch), CodebookConfig(num_codes=16, k=2))
    out = evaluate(model, BATCHES)
    assert out["base"] == base_only["base"]
    assert out["codebook"]["loss"] != out["base"]["loss"]
    model.enabled = False  # codebooks switched off: the "codebook" model is the base model
    off = evaluate(model, BATCHES)
    for key in ("loss", "accuracy", "perplexity"):
        assert off["codebook"][key] == off["base"][key] == base_only["base"][key]
    assert off["loss_increase"] == 0.0


def test_codebook_metrics_and_statistics_are_left_alone() -> None:
    model = attach_codebooks(
        tiny_model("gpt2"),
        CodebookConfig(num_codes=16, k=2, placements=["attn_heads", "mlp_out"]),
    )
    model.train()
    model(input_ids=IDS[:2])  # some training-time statistics
    before = {n: (cb.counts.clone(), int(cb.tokens_seen)) for n, cb in model.codebooks.items()}
    out = evaluate(model, BATCHES)
    assert model.training, "evaluate must restore the training mode"
    for n, layer in model.codebooks.items():
        assert torch.equal(layer.counts, before[n][0]) and int(layer.tokens_seen) == before[n][1]
    model.eval()  # the reference needs eval mode too (no dropout)
    loss, acc = reference(model)
    assert out["codebook"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["codebook"]["accuracy"] == pytest.approx(acc)
    assert out["loss_increase"] == pytest.approx(out["codebook"]["loss"] - out["base"]["loss"])
    heads = out["codebooks"]["layers.0.attn_heads"]
    assert heads["groups"] == 4 and heads["num_codes"] == 16
    assert 0.0 <= heads["dead_fraction"] <= 1.0 and heads["mse"] > 0
    assert 0 < heads["perplexity"] <= 16
    # dead fraction is "never chosen on these tokens": check against recorded codes
    codes = [model.get_codes(b)["layers.0.mlp_out"] for b in BATCHES]
    used = torch.cat([c.reshape(-1) for c in codes]).unique().numel()
    assert out["codebooks"]["layers.0.mlp_out"]["dead_fraction"] == pytest.approx(1 - used / 16)


def test_flatten_and_table() -> None:
    model = attach_codebooks(tiny_model("llama"), CodebookConfig(num_codes=8, k=1))
    out = evaluate(model, BATCHES, max_batches=1)
    assert out["tokens"] == 4 * 11
    flat = flatten_metrics(out)
    assert {"base.loss", "codebook.loss", "base.accuracy", "codebook.accuracy"} <= set(flat)
    assert "codebooks.layers.1.attn_heads.mse" in flat
    assert "codebooks.layers.1.attn_heads.dead_fraction" in flat
    table = format_table(out)
    assert "layers.1.attn_heads" in table and "loss increase from codebooks" in table


def test_no_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="no evaluation batches"):
        evaluate(tiny_model("gpt2"), [])


def test_mixed_module_modes_are_restored_module_by_module() -> None:
    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=16, k=2))
    model.train()
    model.base.eval()  # e.g. a frozen base under trainable codebooks
    before = {name: mod.training for name, mod in model.named_modules()}
    evaluate(model, BATCHES)
    after = {name: mod.training for name, mod in model.named_modules()}
    assert after == before
    assert not model.base.training and all(cb.training for cb in model.codebooks.values())
