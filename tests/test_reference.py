"""Reference checkpoints (the paper's code): the affine LayerNorm option, conversion, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from codebook_lens import CodebookConfig, CodebookLayer, CodebookModel, attach_codebooks


# ------------------------------------------------------------- affine LayerNorm option
def test_affine_layer_norm_scores_the_affine_normalised_input() -> None:
    layer = CodebookLayer(16, 20, 2, groups=2, layer_norm=True, layer_norm_affine=True, seed=0)
    assert layer.ln_weight is not None and layer.ln_bias is not None
    assert layer.ln_weight.shape == (2, 8) and layer.ln_bias.shape == (2, 8)
    with torch.no_grad():
        layer.ln_weight.copy_(torch.rand(2, 8) + 0.5)
        layer.ln_bias.copy_(torch.randn(2, 8))
    x = torch.randn(7, 16) * 3 + 1
    out = layer(x)
    for g in range(2):
        xs = F.layer_norm(x[:, g * 8 : (g + 1) * 8], (8,), layer.ln_weight[g], layer.ln_bias[g])
        cb = layer.codebook[g].detach()
        expected = (xs @ F.normalize(cb, dim=-1).T).topk(2, dim=-1).indices
        assert torch.equal(out.codes[:, g], expected), f"group {g}"
    torch.testing.assert_close(out.output, layer.decode(out.codes), rtol=0, atol=0)


def test_affine_layer_norm_at_identity_equals_plain_layer_norm() -> None:
    plain = CodebookLayer(16, 20, 1, layer_norm=True, seed=3)
    affine = CodebookLayer(16, 20, 1, layer_norm=True, layer_norm_affine=True, seed=3)
    x = torch.randn(9, 16)
    assert torch.equal(plain(x).codes, affine(x).codes)
    assert "ln_weight" not in plain.state_dict() and "ln_weight" in affine.state_dict()


def test_affine_layer_norm_parameters_get_gradient_and_train_with_codebooks() -> None:
    layer = CodebookLayer(8, 10, 1, layer_norm=True, layer_norm_affine=True, seed=0)
    x = torch.randn(5, 8)
    (layer(x).output.sum()).backward()
    assert layer.ln_weight is not None and layer.ln_weight.grad is not None
    assert float(layer.ln_weight.grad.abs().sum()) > 0
    model = attach_codebooks(
        tiny_model("gpt_neox"),
        CodebookConfig(num_codes=8, k=1, placements=["mlp_out"], layer_norm=True,
                       layer_norm_affine=True),
    )  # fmt: skip
    ids = {id(p) for p in model.codebook_parameters()}
    for layer in model.codebooks.values():
        assert id(layer.ln_weight) in ids and id(layer.ln_bias) in ids


def test_affine_layer_norm_is_saved_and_loaded(tmp_path: Path) -> None:
    cfg = CodebookConfig(
        num_codes=8, k=2, placements=["attn_heads"], layer_norm=True, layer_norm_affine=True
    )
    model = attach_codebooks(tiny_model("gpt_neox"), cfg)
    with torch.no_grad():
        for layer in model.codebooks.values():
            assert layer.ln_weight is not None and layer.ln_bias is not None
            layer.ln_weight.normal_()
            layer.ln_bias.normal_()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "m")
    again = CodebookModel.from_pretrained(tmp_path / "m")
    assert again.config.layer_norm_affine
    torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)


def test_affine_layer_norm_needs_layer_norm() -> None:
    with pytest.raises(ValueError, match="layer_norm_affine=True is invalid with layer_norm=Fal"):
        CodebookConfig(layer_norm_affine=True)
    with pytest.raises(ValueError, match="layer_norm_affine=True is invalid with layer_norm=Fal"):
        CodebookLayer(8, 4, layer_norm_affine=True)
