"""CodebookLayer fast paths: two-stage top-k, fp32 scores under autocast, FAISS index, CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_lens import CodebookLayer
from codebook_lens.model.layer import (
    _block_size,
    _top1_padded,
    _top1_padded_layout,
    topk_indices,
)


def brute_force_codes(layer: CodebookLayer, x: torch.Tensor, k: int) -> torch.Tensor:
    """Full score matrix + torch.topk, per group: the dense reference. ``x`` is (N, dim)."""
    xg = x.reshape(-1, layer.groups, layer.head_dim).float()
    cb = layer.codebook.detach().float()
    out = []
    for g in range(layer.groups):
        xs, c = xg[:, g], cb[g]
        if layer.similarity == "cosine":
            scores = F.normalize(xs, dim=-1) @ F.normalize(c, dim=-1).T
        elif layer.similarity == "inner_product":
            scores = xs @ c.T
        else:
            scores = -torch.cdist(xs, c)
        out.append(scores.topk(k, dim=-1).indices)
    return torch.stack(out, dim=1)  # (N, G, k)


@pytest.mark.parametrize("num_codes", [300, 1000, 4096, 10_007, 50_000])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_indices_equals_torch_topk(num_codes: int, k: int) -> None:
    torch.manual_seed(num_codes + k)
    scores = torch.randn(2, 37, num_codes)
    got = topk_indices(scores, k)
    ref = scores.topk(k, dim=-1)
    assert got.shape == (2, 37, k)
    # Same values in the same (descending) order; with continuous scores, the same ids.
    torch.testing.assert_close(scores.gather(-1, got), ref.values, rtol=0, atol=0)
    assert torch.equal(got, ref.indices)


@pytest.mark.parametrize("num_codes", [1000, 10_000, 50_000])
def test_top1_padded_equals_topk_indices_ties_included(num_codes: int) -> None:
    b, nb, nbp = _top1_padded_layout(num_codes, 1)
    assert b and nbp % 16 == 0 and nbp > nb
    torch.manual_seed(num_codes)
    scores = torch.randn(53, num_codes).round(decimals=1)  # many exact ties
    scores[0] = 0.0  # all tied
    padded = torch.full((53, b, nbp), float("nan"))  # the pads are overwritten
    padded[:, :, :nb] = scores.view(53, b, nb)
    assert torch.equal(_top1_padded(padded.view(53, -1), b, nb), topk_indices(scores, 1))


def test_topk_indices_uses_two_stages_for_large_codebooks() -> None:
    assert _block_size(100, 8) == 0  # small: plain torch.topk
    assert _block_size(1000, 8) == 0 and _block_size(1000, 1) > 1
    b = _block_size(10_000, 8)
    assert b > 1 and 10_000 % b == 0
    assert _block_size(10_007, 8) > 1  # prime: a ragged tail, still two-stage


def test_topk_indices_with_banned_codes_never_picks_them() -> None:
    torch.manual_seed(0)
    scores = torch.randn(50, 5000)
    banned = torch.zeros(5000, dtype=torch.bool)
    banned[torch.randperm(5000)[:4900]] = True
    # Ban exactly the best codes too, so the winners come from the 100 allowed ones.
    edited = scores.masked_fill(banned, float("-inf"))
    got = topk_indices(edited, 8)
    assert not banned[got].any()
    assert torch.equal(got, edited.topk(8, dim=-1).indices)


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
def test_chunked_two_stage_search_matches_dense_reference(similarity: str) -> None:
    torch.manual_seed(3)
    layer = CodebookLayer(64, 3000, 8, groups=2, similarity=similarity, chunk_size=50, seed=1)
    x = torch.randn(301, 64)
    assert torch.equal(layer(x).codes, brute_force_codes(layer, x, 8))


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
def test_eval_score_cache_follows_codebook_changes(similarity: str) -> None:
    torch.manual_seed(0)
    layer = CodebookLayer(16, 500, 4, similarity=similarity, seed=0).eval()
    x = torch.randn(64, 16)
    layer(x)  # fills the cache
    with torch.no_grad():
        layer.codebook.mul_(-1.5)  # optimizer-style in-place update
    fresh = CodebookLayer(16, 500, 4, similarity=similarity).eval()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x).codes, fresh(x).codes)
    layer.load_state_dict(CodebookLayer(16, 500, 4, similarity=similarity, seed=9).state_dict())
    assert torch.equal(layer(x).codes, brute_force_codes(layer, x, 4)[:, 0])
    layer.codebook.data.copy_(torch.randn(1, 500, 16))  # .data writes: re-enter eval
    layer.eval()
    assert torch.equal(layer(x).codes, brute_force_codes(layer, x, 4)[:, 0])


def test_search_with_no_tokens() -> None:
    layer = CodebookLayer(16, 2000, 4, seed=0)
    out = layer(torch.randn(0, 16))
    assert out.codes.shape == (0, 4)
    assert out.output.shape == (0, 16)


def test_bag_sum_gradients_match_autograd_reference() -> None:
    from codebook_lens.model.layer import _BagSum

    torch.manual_seed(0)
    table = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    bags = torch.randint(0, 30, (12, 4))
    bags[0] = 7  # repeated ids inside one bag accumulate
    weights = torch.rand(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: _BagSum.apply(t, bags, w), (table, weights))
    assert torch.autograd.gradcheck(lambda t: _BagSum.apply(t, bags, None), (table,))
    out = _BagSum.apply(table, bags, weights)
    torch.testing.assert_close(out, (table[bags] * weights.unsqueeze(-1)).sum(1))


# ------------------------------------------------------------------ autocast / low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_fp32_scores_and_codes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = CodebookLayer(64, 2000, 8, groups=2, seed=0)
    x = torch.randn(4, 33, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        low = layer(x)
    assert torch.equal(low.codes, ref.codes), "codes must equal the fp32 choices"
    assert low.output.dtype == torch.float32
    torch.testing.assert_close(low.output, ref.output, rtol=0, atol=0)


def test_low_precision_codebook_scores_in_fp32() -> None:
    torch.manual_seed(0)
    layer = CodebookLayer(32, 2000, 4, seed=0).to(torch.bfloat16)
    x = torch.randn(200, 32, dtype=torch.bfloat16)
    out = layer(x)
    assert out.output.dtype == torch.bfloat16
    # Reference: the same bf16 numbers, scored in fp32.
    ref = CodebookLayer(32, 2000, 4, seed=0)
    ref.codebook.data.copy_(layer.codebook.data.float())
    assert torch.equal(out.codes, ref(x.float()).codes)
    torch.testing.assert_close(out.output, layer.decode(out.codes), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ faiss
faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
def test_faiss_exact_index_equals_exact_search(similarity: str) -> None:
    torch.manual_seed(5)
    layer = CodebookLayer(48, 1500, 8, groups=3, similarity=similarity, seed=2).eval()
    x = torch.randn(2, 40, 48)
    exact = layer(x)
    layer.build_index()
    fast = layer(x)
    assert torch.equal(fast.codes, exact.codes)
    torch.testing.assert_close(fast.output, exact.output, rtol=0, atol=0)


def test_faiss_index_follows_codebook_updates_and_training_uses_torch() -> None:
    torch.manual_seed(0)
    layer = CodebookLayer(16, 500, 4, seed=0).eval()
    layer.build_index()
    x = torch.randn(64, 16)
    before = layer(x).codes
    with torch.no_grad():
        layer.codebook.mul_(-1.0)  # every ranking flips
    after = layer(x).codes
    layer.drop_index()
    assert torch.equal(after, layer(x).codes)
    assert not torch.equal(after, before)
    layer.build_index()
    layer.train()
    # In training the index is bypassed: same codes as exact search with no index.
    codes_train = layer(x).codes
    layer.drop_index()
    assert torch.equal(codes_train, layer(x).codes)


def test_faiss_ivf_with_every_cell_probed_is_exact() -> None:
    torch.manual_seed(1)
    layer = CodebookLayer(32, 1024, 4, seed=3).eval()
    x = torch.randn(100, 32)
    exact = layer(x).codes
    layer.build_index(nlist=16, nprobe=16)
    assert torch.equal(layer(x).codes, exact)


def test_faiss_index_bad_options() -> None:
    layer = CodebookLayer(16, 100, 2)
    with pytest.raises(
        ValueError, match=r"nlist=101 is invalid; it must be an integer in \[0, 100\]"
    ):
        layer.build_index(nlist=101)
    with pytest.raises(ValueError, match="nprobe=0 is invalid"):
        layer.build_index(nlist=10, nprobe=0)


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_matches_cpu_and_trains() -> None:
    torch.manual_seed(0)
    cpu = CodebookLayer(128, 5000, 8, groups=4, dead_code_steps=2, seed=0)
    gpu = CodebookLayer(128, 5000, 8, groups=4, dead_code_steps=2, seed=0).cuda()
    x = torch.randn(3, 500, 128)
    out_c, out_g = cpu(x), gpu(x.cuda())
    assert torch.equal(out_g.codes.cpu(), out_c.codes)
    torch.testing.assert_close(out_g.output.cpu(), out_c.output)
    gpu.train()
    out = gpu(x.cuda())
    (out.output.sum() + out.loss).backward()
    gpu.step()
    assert gpu.codebook.grad is not None and torch.isfinite(gpu.codebook.grad).all()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(gpu(x.cuda()).codes, gpu(x.cuda()).codes)


@pytest.mark.parametrize(("groups", "k"), [(4, 1), (1, 8)])
def test_small_call_on_one_thread_equals_the_threaded_path(
    groups: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small CPU call's element-wise work on one thread: same outputs, codes and gradients,
    and the caller's thread count afterwards."""
    import codebook_lens.model.layer as layer_module

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for limit in (0, layer_module.SMALL_CALL_ELEMENTS):
            monkeypatch.setattr(layer_module, "SMALL_CALL_ELEMENTS", limit)
            layer = CodebookLayer(groups * 16, 600, k, groups=groups, layer_norm=True, seed=0)
            x = torch.randn(3, 700, groups * 16, generator=torch.Generator().manual_seed(1))
            x.requires_grad_(True)
            res = layer(x)
            (res.output.square().sum() + res.loss).backward()
            assert torch.get_num_threads() == 2
            results.append((res.output, res.codes, res.loss, x.grad, layer.codebook.grad))
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_auto_score_dtype_keeps_fp32_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    import codebook_lens.model.layer as layer_module

    monkeypatch.setattr(layer_module, "AUTO_CHECK_SCORES", 1)
    monkeypatch.setattr(layer_module, "bf16_matrix_units", lambda device: (False, "no units"))
    auto = CodebookLayer(32, 300, 4, groups=2, seed=0)
    exact = CodebookLayer(32, 300, 4, groups=2, seed=0, score_dtype="float32")
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    assert auto.score_dtype == "auto"
    assert torch.equal(auto(x).codes, exact(x).codes)
    assert auto.score_dtype_reason == "float32: no units"
    assert not auto._bf16_scores()


@pytest.mark.parametrize(("gain", "want_bf16"), [(1e9, True), (0.0, False)])
def test_auto_score_dtype_checks_agreement_and_time(
    gain: float, want_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With bf16 units, 'auto' picks bf16 only if it gives the fp32 codes and is faster."""
    import codebook_lens.model.layer as layer_module

    monkeypatch.setattr(layer_module, "AUTO_CHECK_SCORES", 1)
    monkeypatch.setattr(layer_module, "AUTO_BF16_GAIN", gain)
    monkeypatch.setattr(layer_module, "bf16_matrix_units", lambda device: (True, "units"))
    layer = CodebookLayer(16, 50, 1, seed=0)
    exact = CodebookLayer(16, 50, 1, seed=0, score_dtype="float32")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    same = torch.equal(
        CodebookLayer(16, 50, 1, seed=0, score_dtype="bfloat16")(x).codes, exact(x).codes
    )
    layer(x)
    assert layer._bf16_scores() == (want_bf16 and same)
    assert layer.score_dtype_reason.startswith("bfloat16" if want_bf16 and same else "float32")
    assert "bf16 codes" in layer.score_dtype_reason
    layer.score_dtype = "float32"  # an explicit choice wins over the check
    assert not layer._bf16_scores()


def test_small_call_backward_restores_threads_on_every_path() -> None:
    """Input without gradient, backward through the loss only, two layers in a row: the
    thread count after each backward is the caller's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = CodebookLayer(16, 40, 1, groups=2, layer_norm=True, seed=0)
        b = CodebookLayer(16, 40, 2, seed=1)
        x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
        a(x).loss.backward()  # x needs no gradient: the end of the pass switches back
        assert torch.get_num_threads() == 2
        xr = x.clone().requires_grad_(True)
        ra = a(xr)
        rb = b(ra.output * 2)
        (rb.output.sum() + ra.loss + rb.loss).backward()
        assert torch.get_num_threads() == 2
        assert xr.grad is not None and a.codebook.grad is not None
        ra = a(xr)
        ra.output.sum().backward()  # the loss unused
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_small_call_outputs_need_gradients_as_before() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = CodebookLayer(16, 40, 1, recon_weight=0.0, seed=0)  # a constant loss
        x = torch.randn(20, 16, requires_grad=True)
        res = layer(x)
        assert res.output.requires_grad and not res.loss.requires_grad
    finally:
        torch.set_num_threads(threads)
