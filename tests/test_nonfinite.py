"""NaN/inf activations never reach a codebook: 'raise' stops cleanly, 'skip' passes them by."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from codebook_lens import CodebookConfig, CodebookLayer, attach_codebooks
from codebook_lens.model.layer import NonFiniteInputError


def poisoned(n: int = 12, dim: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, n, dim)
    x[0, 3, 5] = float("nan")  # token (0, 3), head 0 when dim=16, groups=2
    x[1, 7, 0] = float("inf")  # token (1, 7), head 0
    x[1, 8, 9] = float("-inf")  # token (1, 8), head 1
    return x


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_raise_names_the_problem_and_updates_nothing(bad: float) -> None:
    layer = CodebookLayer(16, 32, 2, groups=2, dead_code_steps=3, kmeans_init=True, seed=0)
    layer.train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 5, 16)
    x[1, 2, 4] = bad
    with pytest.raises(
        NonFiniteInputError, match=r"NaN/inf in 1 of 10 tokens \(first at position \(1, 2\)"
    ):
        layer(x)
    assert isinstance(NonFiniteInputError("x"), ValueError)
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert layer.stats().tokens == 0
    assert not layer._initialized, "k-means must not have run on the bad batch"


def test_skip_passes_bad_slices_through_with_code_minus_one() -> None:
    layer = CodebookLayer(16, 32, 2, groups=2, nonfinite="skip", seed=0)
    x = poisoned()
    out = layer(x)
    bad = torch.zeros(2, 12, 2, dtype=torch.bool)
    bad[0, 3, 0] = bad[1, 7, 0] = bad[1, 8, 1] = True
    assert torch.equal(out.codes == -1, bad.unsqueeze(-1).expand(2, 12, 2, 2))
    heads = out.output.reshape(2, 12, 2, 8)
    xin = x.reshape(2, 12, 2, 8)
    torch.testing.assert_close(heads[bad], xin[bad], rtol=0, atol=0, equal_nan=True)
    # Every good slice is quantized exactly as without the poisoned neighbours.
    clean = layer(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    good = ~bad
    assert torch.equal(out.codes[good], clean.codes[good])
    torch.testing.assert_close(heads[good], clean.output.reshape(2, 12, 2, 8)[good])
    assert math.isfinite(out.loss.item())


def test_skip_keeps_codebook_gradient_and_stats_clean() -> None:
    torch.manual_seed(0)
    layer = CodebookLayer(16, 32, 2, groups=2, nonfinite="skip", seed=0, commitment_weight=0.5)
    layer.train()
    x = poisoned().requires_grad_(True)
    out = layer(x)
    g = torch.randn_like(out.output)
    ((out.output * g).sum() + out.loss).backward()
    assert torch.isfinite(layer.codebook.grad).all()
    # Same gradient as a batch holding only the good slices' contributions.
    ref = CodebookLayer(16, 32, 2, groups=2, seed=0, commitment_weight=0.5)
    ref.codebook.data.copy_(layer.codebook.data)
    keep = (out.codes[..., 0] != -1).reshape(-1, 2)  # (N, G)
    xr = torch.where(
        keep.reshape(2, 12, 2, 1).expand(2, 12, 2, 8), x.detach().reshape(2, 12, 2, 8), 0.0
    )
    ref_out = ref(xr.reshape(2, 12, 16))
    assert torch.equal(ref_out.codes[keep.reshape(2, 12, 2)], out.codes[keep.reshape(2, 12, 2)])
    # Hand-written loss over kept slices only, with the same downstream gradient.
    cb = ref.codebook
    q = torch.stack([cb[h][out.codes.clamp_min(0)[..., h, :]].sum(-2) for h in range(2)], dim=2)
    m = keep.reshape(2, 12, 2, 1).float()
    recon = (((q - xr) ** 2) * m).sum() / (m.sum() * 8)
    ((q * g.reshape(2, 12, 2, 8) * m).sum() + recon).backward()
    torch.testing.assert_close(layer.codebook.grad, cb.grad)

    st = layer.stats()
    assert st.skipped == 3
    assert int(st.counts.sum()) == (24 * 2 - 3) * 2  # kept slices x k
    assert math.isfinite(st.mse) and st.mse > 0
    layer.reset_stats()
    assert layer.stats().skipped == 0


def test_skip_keeps_revival_buffer_and_kmeans_finite() -> None:
    layer = CodebookLayer(
        16, 8, 1, groups=2, nonfinite="skip", dead_code_steps=1, kmeans_init=True, seed=0
    )
    layer.train()
    layer(poisoned())
    assert layer._initialized
    assert torch.isfinite(layer.codebook).all()
    assert torch.isfinite(layer.recent).all()
    for _ in range(3):
        layer(poisoned())
        layer.step()
    assert torch.isfinite(layer.codebook).all()


def test_skip_with_a_fully_bad_batch() -> None:
    layer = CodebookLayer(8, 16, 2, nonfinite="skip", dead_code_steps=1, seed=0)
    layer.train()
    x = torch.full((4, 8), float("nan"))
    out = layer(x)
    assert (out.codes == -1).all()
    assert out.loss.item() == 0.0
    layer.step()
    assert torch.isfinite(layer.codebook).all()
    assert layer.stats().skipped == 4


def test_nonfinite_option_validation_and_config_plumbing() -> None:
    with pytest.raises(ValueError, match="nonfinite='ignore' is invalid; choose 'raise' or 'skip'"):
        CodebookLayer(8, 16, 2, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite='warn' is invalid"):
        CodebookConfig(nonfinite="warn")  # type: ignore[arg-type]
    model = attach_codebooks(
        tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1, nonfinite="skip")
    )
    assert all(layer.nonfinite == "skip" for layer in model.codebooks.values())
    assert CodebookConfig.from_dict({"nonfinite": "skip"}).nonfinite == "skip"


def test_model_with_nan_activations_raises_by_default() -> None:
    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1))
    name = next(iter(model.codebooks))
    # Poison one token's embedding: every codebook downstream of it sees NaN.
    with torch.no_grad():
        model.base.transformer.wte.weight[2, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="NaN/inf"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert model.codebooks[name].stats().tokens == 0
