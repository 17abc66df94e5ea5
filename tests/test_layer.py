"""CodebookLayer: values, gradients, chunking, groups, revival, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_lens import CodebookLayer


def make(dim: int = 16, codes: int = 32, k: int = 2, **kw) -> CodebookLayer:
    return CodebookLayer(dim, codes, k, seed=0, **kw)


def test_output_is_decoding_of_its_codes() -> None:
    layer = make(groups=2)
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert out.output.shape == x.shape
    assert out.codes.shape == (3, 5, 2, 2)
    assert out.codes.dtype == torch.int64
    torch.testing.assert_close(out.output, layer.decode(out.codes), rtol=0, atol=0)


def test_ungrouped_codes_shape_and_mean_reduction() -> None:
    layer = make(k=3, reduction="mean")
    x = torch.randn(4, 16)
    out = layer(x)
    assert out.codes.shape == (4, 3)
    expected = layer.codebook[0][out.codes].mean(-2)
    torch.testing.assert_close(out.output, expected)


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
def test_codes_match_brute_force_similarity(similarity: str) -> None:
    layer = make(k=3, similarity=similarity, chunk_size=7)
    x = torch.randn(50, 16)
    cb = layer.codebook[0].detach()
    if similarity == "cosine":
        scores = F.normalize(x, dim=-1) @ F.normalize(cb, dim=-1).T
    elif similarity == "inner_product":
        scores = x @ cb.T
    else:
        scores = -torch.cdist(x, cb)
    expected = scores.topk(3, dim=-1).indices
    assert torch.equal(layer(x).codes, expected)


def test_straight_through_gradient_to_input_is_identity() -> None:
    layer = make(groups=2, recon_weight=1.0)
    x = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 16)
    out = layer(x)
    # The reconstruction loss must not touch the input: only the downstream gradient does.
    ((out.output * g).sum() + out.loss).backward()
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_commitment_loss_reaches_input() -> None:
    layer = make(recon_weight=0.0, commitment_weight=0.5)
    x = torch.randn(6, 16, requires_grad=True)
    out = layer(x)
    out.loss.backward()
    expected = 0.5 * 2 * (x.detach() - out.output.detach()) / x.numel()
    torch.testing.assert_close(x.grad, expected)


def test_only_chosen_codes_get_gradient() -> None:
    layer = make(codes=64, k=2, groups=2)
    x = torch.randn(5, 16)
    out = layer(x)
    ((out.output * torch.randn_like(out.output)).sum() + out.loss).backward()
    grad_rows = layer.codebook.grad.abs().sum(-1) > 0  # (groups, codes)
    chosen = torch.zeros(2, 64, dtype=torch.bool)
    for g in range(2):
        chosen[g, out.codes[:, g].flatten()] = True
    assert torch.equal(grad_rows, chosen)


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.5])
def test_reconstruction_term_has_documented_weight(weight: float) -> None:
    layer = make(k=2, groups=2, recon_weight=weight)
    x = torch.randn(7, 16)
    g = torch.randn(7, 16)
    out = layer(x)
    ((out.output * g).sum() + out.loss).backward()

    # The same quantity, written out by hand on a copy of the codebook.
    cb = layer.codebook.detach().clone().requires_grad_(True)
    codes = out.codes  # (7, 2, 2)
    q = torch.stack([cb[h][codes[:, h]].sum(-2) for h in range(2)], dim=1).reshape(7, 16)
    manual = (q * g).sum() + weight * ((q - x) ** 2).mean()
    manual.backward()
    torch.testing.assert_close(
        out.loss, torch.tensor(weight * ((q.detach() - x) ** 2).mean().item())
    )
    torch.testing.assert_close(layer.codebook.grad, cb.grad)


def test_chunked_scoring_equals_unchunked() -> None:
    torch.manual_seed(1)
    small = make(dim=32, codes=500, k=4, groups=4, chunk_size=8)
    big = make(dim=32, codes=500, k=4, groups=4, chunk_size=1_000_000)
    big.load_state_dict(small.state_dict())
    x = torch.randn(2, 97, 32)
    assert torch.equal(small(x).codes, big(x).codes)


def test_grouped_equals_per_head_loop() -> None:
    heads, d = 4, 8
    grouped = make(dim=heads * d, codes=40, k=3, groups=heads)
    x = torch.randn(3, 11, heads * d)
    out = grouped(x)
    for h in range(heads):
        single = CodebookLayer(d, 40, 3)
        single.codebook.data.copy_(grouped.codebook.data[h : h + 1])
        o = single(x[..., h * d : (h + 1) * d])
        assert torch.equal(o.codes, out.codes[..., h, :])
        torch.testing.assert_close(o.output, out.output[..., h * d : (h + 1) * d], rtol=0, atol=0)


def test_dead_code_revival_touches_exactly_the_unused_codes() -> None:
    torch.manual_seed(0)
    layer = make(dim=8, codes=16, k=1, dead_code_steps=2, similarity="euclidean")
    layer.train()
    # Inputs sit on top of codes 0..3 only, so codes 4..15 are never chosen.
    base = layer.codebook.detach()[0, :4].clone()
    before = layer.codebook.detach().clone()
    for _ in range(2):
        x = base[torch.randint(0, 4, (64,))] + 1e-4 * torch.randn(64, 8)
        out = layer(x)
        assert set(out.codes.flatten().tolist()) <= {0, 1, 2, 3}
        layer.step()
    after = layer.codebook.detach()
    assert torch.equal(after[0, :4], before[0, :4]), "used codes must be untouched"
    changed = (after[0, 4:] != before[0, 4:]).any(-1)
    assert changed.all(), "every unused code must be re-initialised"
    assert int(layer.revived) == 12
    # Revived codes come from recent inputs: each is close to one of the 4 used codes.
    dist = torch.cdist(after[0, 4:], base).min(-1).values
    assert (dist < 0.1 * base.norm(dim=-1).min()).all()


def test_no_revival_before_the_window() -> None:
    layer = make(dim=8, codes=16, k=1, dead_code_steps=5)
    layer.train()
    before = layer.codebook.detach().clone()
    for _ in range(4):
        layer(torch.randn(3, 8))
        layer.step()
    assert int(layer.revived) == 0
    assert torch.equal(before, layer.codebook.detach())


def test_kmeans_init_reduces_reconstruction_error() -> None:
    torch.manual_seed(0)
    centers = torch.randn(8, 16) * 3
    x = centers[torch.randint(0, 8, (512,))] + 0.05 * torch.randn(512, 16)
    plain = make(codes=32, k=1, similarity="euclidean")
    km = make(codes=32, k=1, similarity="euclidean", kmeans_init=True)
    km.train()
    km(x)  # first training batch initialises the codes
    assert bool(km.initialized)
    err_plain = F.mse_loss(plain(x).output, x).item()
    err_km = F.mse_loss(km(x).output, x).item()
    assert err_km < 0.2 * err_plain


def test_stats_count_usage() -> None:
    layer = make(codes=10, k=1, groups=1)
    x = torch.randn(20, 16)
    codes = layer(x).codes
    st = layer.stats()
    assert st.tokens == 20
    assert int(st.counts.sum()) == 20
    assert st.dead_fraction == pytest.approx(1 - len(set(codes.flatten().tolist())) / 10)
    assert 0 < st.perplexity <= 10
    layer.reset_stats()
    assert layer.stats().tokens == 0


def test_layer_norm_option_outputs_in_normalised_space() -> None:
    layer = make(layer_norm=True, k=1)
    x = torch.randn(5, 16) * 10 + 3
    out = layer(x)
    torch.testing.assert_close(out.output, layer.decode(out.codes))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 33}, "k=33 is invalid"),
        ({"k": 0}, "k=0 is invalid"),
        ({"groups": 3}, "dim=16 is invalid for groups=3"),
        ({"similarity": "cos"}, "similarity='cos' is invalid; choose 'cosine'"),
        ({"reduction": "max"}, "reduction='max' is invalid"),
        ({"recon_weight": -1.0}, "recon_weight=-1.0 is invalid"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, message: str) -> None:
    args = {"dim": 16, "num_codes": 32, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CodebookLayer(args.pop("dim"), args.pop("num_codes"), args.pop("k"), **args)


def test_wrong_input_width_and_bad_decode_ids() -> None:
    layer = make()
    with pytest.raises(ValueError, match="does not match dim=16"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="code ids must be in"):
        layer.decode(torch.tensor([[0, 99]]))


def test_half_precision_input_keeps_dtype_and_fp32_codes() -> None:
    layer = make(groups=2)
    x = torch.randn(4, 16)
    out32 = layer(x)
    out16 = layer(x.to(torch.bfloat16))
    assert out16.output.dtype == torch.bfloat16
    # Scores are computed in fp32 on the rounded input: nearly always the same codes.
    assert (out16.codes == out32.codes).float().mean() > 0.9


# ------------------------------------------------------- tiled CPU search and gradient reuse
def _codes(layer: CodebookLayer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x).codes


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
def test_tiled_search_same_codes_at_any_thread_count_and_mode(similarity: str) -> None:
    torch.manual_seed(0)
    # 600 tokens x 2 groups x 3000 codes: past the small-search cutoff, so tiles and threads.
    layer = CodebookLayer(64, 3000, 8, groups=2, similarity=similarity, seed=4).train()
    x = torch.randn(600, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _codes(layer, x)
        torch.set_num_threads(3)
        three = _codes(layer, x)
        assert torch.get_num_threads() == 3, "the caller's thread count must be restored"
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(_codes(layer.eval(), x), one), "eval (cached weights) must match training"
    # A small search (one batched product) ranks on the same numbers.
    assert torch.equal(_codes(layer, x[:20]), one[:20])


def test_reused_gradient_buffer_gives_fresh_gradients() -> None:
    torch.manual_seed(0)
    # 4 x 1024 x 64 = 2**18 elements: large enough for the reused gradient buffer.
    layer = CodebookLayer(256, 1024, 4, groups=4, seed=0).train()
    ref = CodebookLayer(256, 1024, 4, groups=4, seed=0).train()
    ref._grad_buffer.MIN_ELEMENTS = 1 << 30  # the plain torch.zeros path
    kept = []
    for step in range(4):
        x = torch.randn(50, 256)
        for lay in (layer, ref):
            out = lay(x)
            (out.output.square().sum() + out.loss).backward()
        assert torch.equal(layer.codebook.grad, ref.codebook.grad), step
        if step == 1:
            kept.append(layer.codebook.grad)  # a user keeps a gradient: it must stay intact
            kept.append(layer.codebook.grad.clone())
        if step == 2:
            layer.codebook.grad.mul_(float("nan"))  # an outside in-place write to .grad
        layer.codebook.grad = ref.codebook.grad = None
    assert torch.equal(kept[0], kept[1])


def test_gradient_accumulation_with_reused_buffer() -> None:
    torch.manual_seed(1)
    layer = CodebookLayer(256, 1024, 2, groups=4, seed=0).train()
    xs = [torch.randn(30, 256) for _ in range(3)]
    total = torch.zeros_like(layer.codebook)
    for x in xs:  # reference: each micro-batch's gradient alone, summed
        layer.codebook.grad = None
        out = layer(x)
        (out.output.sum() + out.loss).backward()
        total += layer.codebook.grad
    layer.codebook.grad = None
    for x in xs:  # accumulated into one .grad
        out = layer(x)
        (out.output.sum() + out.loss).backward()
    torch.testing.assert_close(layer.codebook.grad, total)


def test_bf16_scoring_reranks_to_the_fp32_codes() -> None:
    torch.manual_seed(0)
    exact = CodebookLayer(128, 4000, 8, groups=2, seed=3)
    low = CodebookLayer(128, 4000, 8, groups=2, seed=3, score_dtype="bfloat16")
    x = torch.randn(300, 128)
    a, b = _codes(exact, x), _codes(low, x)
    agree = (a == b).all(-1).float().mean()
    assert agree >= 0.99, f"bf16 codes agree with fp32 on only {agree:.3f} of (token, head)"
    small = _codes(low, x[:4])  # the batched path re-ranks too
    assert (small == a[:4]).all(-1).float().mean() >= 0.75
    with pytest.raises(ValueError, match="score_dtype='fp16' is invalid"):
        CodebookLayer(16, 32, 2, score_dtype="fp16")
