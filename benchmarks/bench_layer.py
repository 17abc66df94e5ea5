"""One codebook layer, forward + backward: ours vs the matmul floor, a dense top-k, and a peer.

Contenders, all measured side by side in one run (interleaved, medians over ``--repeats``):

- ``floor``: the bare similarity matmul ``x @ codes.T`` (forward only; the unavoidable cost);
- ``ours``: ``CodebookLayer`` forward + backward (chunked scoring, two-stage top-k);
- ``dense``: the full ``tokens x codes`` score matrix, ``topk``, gather, straight-through and
  reconstruction loss, forward + backward (the paper's code's formulation);
- ``ours k=1`` and ``vq k=1``: ``vector_quantize_pytorch.VectorQuantize`` with cosine
  similarity (its default EMA codebook update and commitment loss), against our layer at k=1.

Peak memory is the peak of tensor bytes allocated during one forward + backward (see
``common.peak_extra_bytes``).

The machine's limit is measured in the same run, interleaved with the key case: a square
compute-bound matmul in fp32 and in bf16 gives the peak FLOP/s, and every layer time is
reported as a multiple of the compute floor ``2 * tokens * groups * C * head_dim / peak_fp32``
(``compute_floor_ratio``; the bf16 search, ``score_dtype='bfloat16'``, against the same fp32
floor in ``compute_floor_ratio_bf16``, with ``bf16_code_agreement``: the fraction of tokens
whose k codes equal the fp32 ones). ``--quick`` measures only that. Also: the issue-2 case (16,384 tokens x C=10,000 x D=64, k=8)
and its grouped 8-head version, a chunk-size sweep, eval-mode search with a FAISS index, and
(``--compile``) ``torch.compile`` of the layer.

    python benchmarks/bench_layer.py            # representative subset (minutes on 2 cores)
    python benchmarks/bench_layer.py --full     # C in {1k,10k,50k} x tokens {4k,32k} x D {64,512}
    python benchmarks/bench_layer.py --tiny     # seconds; what tests/test_benchmarks.py runs
    python benchmarks/bench_layer.py --quick    # the machine's peak and the key case's floor ratios
    python benchmarks/bench_layer.py --breakdown   # fp32 / bf16 time per search step, one thread
    python benchmarks/bench_layer.py --per-call    # small calls: profile, small-call path on/off
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    fmt_bytes,
    machine,
    peak_extra_bytes,
    print_table,
    save_section,
    similarity_floor,
    time_interleaved,
    time_wall_cpu,
    update_section,
)

from codebook_lens import CodebookLayer  # noqa: E402
from codebook_lens.model.cpu_threads import one_cpu_thread  # noqa: E402
from codebook_lens.model.layer import cpu_flags  # noqa: E402

KEY = {"tokens": 32_768, "num_codes": 10_000, "dim": 64, "k": 8}
"""The configuration whose numbers go to results.json's headline keys (issue 8)."""


def grid(full: bool, tiny: bool) -> list[tuple[int, int, int]]:
    """(tokens, num_codes, dim) cases."""
    if tiny:
        return [(512, 1000, 32)]
    if full:
        return list(itertools.product((4096, 32_768), (1000, 10_000, 50_000), (64, 512)))
    # Every axis moves once away from the key case; the 50k x 32k dense matrix (6.5 GB) and
    # the 512-wide 32k cases only in --full.
    return [
        (4096, 1000, 64),
        (4096, 10_000, 64),
        (4096, 50_000, 64),
        (4096, 10_000, 512),
        (32_768, 1000, 64),
        (32_768, 10_000, 64),
    ]


# ------------------------------------------------------------------------- contenders
class Case:
    """Inputs and contenders for one (tokens, C, D, k, groups) case."""

    def __init__(
        self,
        tokens: int,
        num_codes: int,
        dim: int,
        k: int,
        groups: int,
        device: torch.device,
        chunk_size: int | None = None,
    ) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(tokens, dim, generator=gen).to(device).requires_grad_(True)
        self.g = torch.randn(tokens, dim, generator=gen).to(device)
        self.one = torch.ones((), device=device)
        kw: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
        self.layer = CodebookLayer(dim, num_codes, k, groups=groups, seed=0, **kw).to(device)
        self.layer.train()
        self.k, self.groups, self.device = k, groups, device
        self.head_dim = dim // groups

    def _backward(self, out: torch.Tensor, loss: torch.Tensor) -> None:
        torch.autograd.backward((out, loss), (self.g, self.one))

    def floor(self) -> torch.Tensor:
        """The bare similarity matmul (all groups): the score matrix, nothing else."""
        return similarity_floor(self.x, self.layer.codebook)

    def ours(self) -> None:
        self.layer.codebook.grad = None
        self.x.grad = None
        res = self.layer(self.x)
        self._backward(res.output, res.loss)

    def dense(self) -> None:
        """Full scores + topk + gather, straight-through, recon loss; forward + backward."""
        self.layer.codebook.grad = None
        self.x.grad = None
        cb = self.layer.codebook  # (G, C, d)
        g, d, c = self.groups, self.head_dim, cb.shape[1]
        xg = self.x.view(-1, g, d)
        with torch.no_grad():
            w = F.normalize(cb, dim=-1)
            scores = torch.bmm(xg.detach().transpose(0, 1), w.transpose(1, 2))  # (G, N, C)
            idx = scores.topk(self.k, dim=-1).indices.transpose(0, 1)  # (N, G, k)
            idx = idx + torch.arange(g, device=idx.device).view(1, g, 1) * c
        q = F.embedding(idx, cb.reshape(g * c, d)).sum(-2)  # (N, G, d)
        loss = F.mse_loss(q, xg.detach())
        out = (q + (xg - xg.detach())).reshape(self.x.shape)
        self._backward(out, loss)


def make_vq(dim: int, num_codes: int, device: torch.device) -> Callable[[torch.Tensor], Any] | None:
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    torch.manual_seed(0)
    vq = VectorQuantize(dim=dim, codebook_size=num_codes, use_cosine_sim=True).to(device)
    vq.train()
    return vq  # type: ignore[no-any-return]


def run_case(
    tokens: int,
    num_codes: int,
    dim: int,
    k: int,
    groups: int,
    repeats: int,
    device: torch.device,
    *,
    peers: bool = True,
) -> dict[str, Any]:
    """Time and peak memory of every contender on one case."""
    case = Case(tokens, num_codes, dim, k, groups, device)
    fns: dict[str, Callable[[], object]] = {
        "floor": case.floor,
        "ours": case.ours,
        "dense": case.dense,
    }
    vq = make_vq(dim, num_codes, device) if peers and groups == 1 else None
    if peers and groups == 1:
        case1 = Case(tokens, num_codes, dim, 1, 1, device)
        fns["ours_k1"] = case1.ours
        if vq is not None:
            x1 = case1.x

            def vq_step() -> None:
                x1.grad = None
                for p in vq.parameters():  # type: ignore[attr-defined]
                    p.grad = None
                quantized, _, loss = vq(x1.unsqueeze(0))
                torch.autograd.backward((quantized[0], loss.sum()), (case1.g, case1.one))

            fns["vq_k1"] = vq_step
    secs, cpu = time_wall_cpu(fns, repeats, device=device)
    mem = {name: peak_extra_bytes(fn, device) for name, fn in fns.items()}
    print(
        f"  {tokens:,} x {num_codes:,} x {dim} (groups={groups}, k={k}): "
        + ", ".join(f"{n} {secs[n]:.3f} s" for n in fns),
        flush=True,
    )
    return {
        "tokens": tokens,
        "num_codes": num_codes,
        "dim": dim,
        "k": k,
        "groups": groups,
        "seconds": secs,
        "cpu_seconds": cpu,
        "peak_bytes": mem,
    }


def case_row(r: dict[str, Any]) -> list[str]:
    s, m, cpu = r["seconds"], r["peak_bytes"], r["cpu_seconds"]
    shape = f"{r['tokens']:,} x {r['num_codes']:,} x {r['dim']}" + (
        f" ({r['groups']} heads)" if r["groups"] > 1 else ""
    )
    vq = f"{s['vq_k1'] / s['ours_k1']:.2f}x" if "vq_k1" in s else "-"
    return [
        shape,
        f"{s['floor']:.3f}",
        f"{s['ours']:.3f}",
        f"{s['dense']:.3f}",
        f"{s['ours'] / s['floor']:.2f}",
        f"{s['dense'] / s['ours']:.2f}x",
        fmt_bytes(m["ours"]),
        fmt_bytes(m["dense"]),
        f"{m['ours'] / max(m['dense'], 1):.3f}",
        f"{cpu['ours'] / cpu['floor']:.2f}",
        f"{cpu['dense'] / cpu['ours']:.2f}x",
        f"{s['ours_k1']:.3f}" if "ours_k1" in s else "-",
        f"{s['vq_k1']:.3f}" if "vq_k1" in s else "-",
        vq,
        fmt_bytes(m["vq_k1"]) if "vq_k1" in m else "-",
        f"{r['compute_floor_ratio']:.2f}" if "compute_floor_ratio" in r else "-",
    ]


HEADER = [
    "tokens x C x D (k=8)",
    "floor s",
    "ours s",
    "dense s",
    "ours/floor",
    "vs dense",
    "ours mem",
    "dense mem",
    "mem ratio",
    "cpu ours/floor",
    "cpu vs dense",
    "ours k=1 s",
    "vq k=1 s",
    "vq/ours k=1",
    "vq mem",
    "ours / compute floor",
]


# ------------------------------------------------------------------------- the floor
def cpu_matrix_units() -> dict[str, bool]:
    """Which bf16 matrix instructions this CPU has (from /proc/cpuinfo flags)."""
    flags = cpu_flags()
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def square_matmul(n: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A compute-bound ``n x n`` matmul (``run.flops`` = 2 n^3)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run() -> torch.Tensor:
        return a @ b

    run.flops = 2 * n**3  # type: ignore[attr-defined]
    run.size = n  # type: ignore[attr-defined]
    return run


def layer_flops(tokens: int, groups: int, num_codes: int, head_dim: int) -> int:
    """The scoring's multiply-adds x 2: what no exact search can skip."""
    return 2 * tokens * groups * num_codes * head_dim


def floor_case(key: dict[str, int], repeats: int, device: torch.device) -> dict[str, Any]:
    """Peak FLOP/s (fp32, bf16) and the key case's fp32/bf16 layer, interleaved in one run."""
    case = Case(key["tokens"], key["num_codes"], key["dim"], key["k"], 1, device)
    low = Case(key["tokens"], key["num_codes"], key["dim"], key["k"], 1, device)
    low.layer = CodebookLayer(
        key["dim"], key["num_codes"], key["k"], seed=0, score_dtype="bfloat16"
    ).to(device)
    low.layer.train()
    # Fixed sizes, compute-bound on any machine; bf16 without bf16 units is ~30x slower here.
    units = cpu_matrix_units()
    fast16 = device.type != "cpu" or units["avx512_bf16"] or units["amx_bf16"]
    small = key["tokens"] < 4096
    sq32 = square_matmul(1024 if small else 2048, torch.float32, device)
    sq16 = square_matmul(256 if small else (2048 if fast16 else 512), torch.bfloat16, device)
    fns: dict[str, Callable[[], object]] = {
        "square_fp32": sq32,
        "square_bf16": sq16,
        "ours": case.ours,
        "ours_bf16": low.ours,
    }
    secs, cpu = time_wall_cpu(fns, repeats, device=device)
    peak32, peak16 = sq32.flops / secs["square_fp32"], sq16.flops / secs["square_bf16"]
    peak32_cpu = sq32.flops / cpu["square_fp32"]
    floor = layer_flops(key["tokens"], 1, key["num_codes"], key["dim"]) / peak32
    with torch.no_grad():
        exact = case.layer(case.x).codes.sort(-1).values
        approx = low.layer(case.x).codes.sort(-1).values
    agreement = float((exact == approx).all(-1).double().mean())
    res = {
        "key_case": key,
        "square_sizes": {"fp32": sq32.size, "bf16": sq16.size},
        "peak_flops_fp32": peak32,
        "peak_flops_bf16": peak16,
        "compute_floor_s": floor,
        "seconds": secs,
        "cpu_seconds": cpu,
        "compute_floor_ratio": secs["ours"] / floor,
        "compute_floor_ratio_bf16": secs["ours_bf16"] / floor,
        # The issue's target where bf16 units exist: bf16 at least twice as fast as fp32.
        "bf16_vs_fp32": secs["ours_bf16"] / secs["ours"],
        # CPU seconds of ours vs CPU seconds the floor's FLOPs take at the CPU-time peak.
        "cpu_compute_floor_ratio": cpu["ours"]
        * peak32_cpu
        / layer_flops(key["tokens"], 1, key["num_codes"], key["dim"]),
        "bf16_code_agreement": agreement,
        "cpu_matrix_units": cpu_matrix_units(),
    }
    print_table(
        ["contender", "s", "GFLOP/s", "x fp32 compute floor"],
        [
            ["square matmul fp32", f"{secs['square_fp32']:.3f}", f"{peak32 / 1e9:.1f}", "-"],
            ["square matmul bf16", f"{secs['square_bf16']:.3f}", f"{peak16 / 1e9:.1f}", "-"],
            ["ours fp32", f"{secs['ours']:.3f}", "-", f"{res['compute_floor_ratio']:.2f}"],
            [
                "ours bf16",
                f"{secs['ours_bf16']:.3f}",
                "-",
                f"{res['compute_floor_ratio_bf16']:.2f}",
            ],
        ],
        f"Machine peak and compute floor, {key['tokens']:,} x {key['num_codes']:,} x "
        f"{key['dim']}, k={key['k']} (floor {floor:.3f} s; bf16 codes agree on "
        f"{agreement:.4f} of tokens; bf16 units {cpu_matrix_units()})",
    )
    return res


def _layer_steps(x: torch.Tensor, num_codes: int, k: int) -> dict[str, Callable[[], object]]:
    """Forward, then backward, of an fp32 and a bf16-scoring layer on ``x`` (in this order)."""
    tokens, dim = x.shape
    gen = torch.Generator().manual_seed(1)
    steps: dict[str, Callable[[], object]] = {}
    for dtype, tag in (("float32", "fp32"), ("bfloat16", "bf16")):
        layer = CodebookLayer(dim, num_codes, k, seed=0, score_dtype=dtype).train()
        xg = x.clone().requires_grad_(True)
        grad = torch.randn(tokens, dim, generator=gen)
        holder: dict[str, Any] = {}

        def fwd(layer: CodebookLayer = layer, xg: torch.Tensor = xg, h: dict = holder) -> None:
            layer.codebook.grad = xg.grad = None
            h["res"] = layer(xg)

        def bwd(grad: torch.Tensor = grad, h: dict = holder) -> None:
            res = h.pop("res")
            torch.autograd.backward((res.output, res.loss), (grad, torch.ones(())))

        steps[f"{tag} layer forward"] = fwd
        steps[f"{tag} layer backward"] = bwd  # runs right after its forward
    return steps


def breakdown(tokens: int, num_codes: int, dim: int, k: int, repeats: int) -> dict[str, Any]:
    """Where a CPU layer call's time goes, fp32 against bf16 scoring, on one thread.

    The search's own steps, over the tiles one task scores (``tile_rows`` rows of the
    ``tokens``): dtype conversion of the inputs and codes, the score matmul, the top-k (bf16:
    of ``k + BF16_MARGIN`` candidates), the exact fp32 re-ranking of those (bf16 only); then the
    whole layer's forward and its backward. Interleaved, medians of ``repeats``.
    """
    import codebook_lens.model.layer as L

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen)
    w = F.normalize(torch.randn(num_codes, dim, generator=gen), dim=-1)
    rows = L.tile_rows(num_codes, 2048)
    tiles = [slice(s, min(s + rows, tokens)) for s in range(0, tokens, rows)]
    m = min(num_codes, k + L.BF16_MARGIN)
    s32 = torch.empty(rows, num_codes)
    s16 = torch.empty(rows, num_codes, dtype=torch.bfloat16)
    x16, w16 = x.bfloat16(), w.bfloat16()

    def each_tile(fn: Callable[[slice], object]) -> Callable[[], None]:
        def run() -> None:
            for t in tiles:
                fn(t)

        return run

    def scores32(t: slice) -> torch.Tensor:
        return torch.mm(x[t], w.t(), out=s32[: t.stop - t.start])

    def scores16(t: slice) -> torch.Tensor:
        return torch.mm(x16[t], w16.t(), out=s16[: t.stop - t.start])

    sc32, sc16 = scores32(tiles[0]).clone(), scores16(tiles[0]).clone()
    steps: dict[str, Callable[[], object]] = {
        "fp32 score matmul": each_tile(scores32),
        "fp32 top-k": each_tile(lambda t: L.topk_indices(sc32[: t.stop - t.start], k)),
        "bf16 dtype conversion": lambda: (x.bfloat16(), w.bfloat16()),
        "bf16 score matmul": each_tile(scores16),
        "bf16 top-k (k + margin)": each_tile(lambda t: L.topk_indices(sc16[: t.stop - t.start], m)),
        "bf16 top-k + exact re-ranking": each_tile(
            lambda t: L.rerank(sc16[: t.stop - t.start], x[t], w, None, k)
        ),
    }
    steps.update(_layer_steps(x, num_codes, k))
    with one_cpu_thread(torch.device("cpu")):
        secs, _ = time_wall_cpu(steps, repeats)
    rerank = secs["bf16 top-k + exact re-ranking"] - secs["bf16 top-k (k + margin)"]
    rows_out = [
        ["dtype conversion (x, codes to bf16)", "-", f"{secs['bf16 dtype conversion']:.4f}"],
        ["score matmul", f"{secs['fp32 score matmul']:.4f}", f"{secs['bf16 score matmul']:.4f}"],
        ["top-k", f"{secs['fp32 top-k']:.4f}", f"{secs['bf16 top-k (k + margin)']:.4f}"],
        ["exact fp32 re-ranking", "-", f"{max(rerank, 0.0):.4f}"],
        ["layer forward (all of it)", f"{secs['fp32 layer forward']:.4f}",
         f"{secs['bf16 layer forward']:.4f}"],
        ["layer backward", f"{secs['fp32 layer backward']:.4f}",
         f"{secs['bf16 layer backward']:.4f}"],
    ]  # fmt: skip
    has_units, why = L.bf16_matrix_units(torch.device("cpu"))
    print_table(
        ["step (one thread)", "fp32 s", "bf16 s"],
        rows_out,
        f"Layer time breakdown, {tokens:,} x {num_codes:,} x {dim}, k={k}, tiles of {rows} rows, "
        f"one thread, median of {repeats}",
    )
    auto = CodebookLayer(dim, num_codes, k, seed=0).train()
    with torch.no_grad():
        auto(x)
    print(f"bf16 matrix units: {why}\nscore_dtype='auto' chose: {auto.score_dtype_reason}")
    return {
        "tokens": tokens, "num_codes": num_codes, "dim": dim, "k": k, "tile_rows": rows,
        "seconds": secs, "rerank_seconds": rerank, "bf16_units": has_units, "bf16_units_why": why,
        "auto_choice": auto.score_dtype_reason, "repeats": repeats,
    }  # fmt: skip


PER_CALL_CASES = {
    "fsm heads 2,080 x 4 x 16, C=1,000, k=1": (2080, 4, 16, 1000, 1),
    "Pythia heads 2,048 x 16 x 64, C=10,000, k=8": (2048, 16, 64, 10_000, 8),
}


def per_call(repeats: int, tiny: bool) -> dict[str, Any]:
    """Small-layer calls (forward + backward, training mode): where the time goes (the
    profiler's top ops) and the small-call path on against off, interleaved."""
    from torch.profiler import ProfilerActivity, profile

    import codebook_lens.model.layer as L

    cases = {"tiny 128 x 2 x 8, C=50, k=1": (128, 2, 8, 50, 1)} if tiny else PER_CALL_CASES
    on = L.SMALL_CALL_ELEMENTS
    out: dict[str, Any] = {}
    for name, (n, g, d, c, k) in cases.items():
        layer = CodebookLayer(g * d, c, k, groups=g, layer_norm=True, reduction="mean", seed=0)
        layer.train()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, n, g * d, generator=gen).requires_grad_(True)
        grad = torch.randn(1, n, g * d, generator=gen)

        def call(limit: int, layer: CodebookLayer = layer, x: torch.Tensor = x,
                 grad: torch.Tensor = grad) -> Callable[[], None]:  # fmt: skip
            def run() -> None:
                L.SMALL_CALL_ELEMENTS = limit
                try:
                    x.grad = layer.codebook.grad = None
                    res = layer(x)
                    torch.autograd.backward((res.output, res.loss), (grad, torch.ones(())))
                finally:
                    L.SMALL_CALL_ELEMENTS = on

            return run

        fns = {"small-call path on": call(on), "off (every op on every thread)": call(0)}
        secs, cpu = time_wall_cpu(fns, repeats, warmup=2)
        tables = {}
        for label, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
            tables[label] = [
                {"op": e.key, "calls": e.count // 3, "self_ms": e.self_cpu_time_total / 3e3,
                 "share": e.self_cpu_time_total / total}
                for e in ops
            ]  # fmt: skip
            print_table(
                ["op", "calls / call", "self ms / call", "share"],
                [
                    [r["op"], str(r["calls"]), f"{r['self_ms']:.2f}", f"{r['share']:.0%}"]
                    for r in tables[label]
                ],  # fmt: skip
                f"Profile of one call, {name}, {label} (torch.profiler, self CPU time)",
            )
        speed = secs["off (every op on every thread)"] / secs["small-call path on"]
        print(f"{name}: on {secs['small-call path on'] * 1e3:.1f} ms, off "
              f"{secs['off (every op on every thread)'] * 1e3:.1f} ms: {speed:.2f}x "
              f"(load average {os.getloadavg()[0]:.2f})")  # fmt: skip
        out[name] = {"seconds": secs, "cpu_seconds": cpu, "speedup": speed, "profile": tables}
    return {"cases": out, "repeats": repeats, "machine": machine()}


# ------------------------------------------------------------------------- extras
def chunk_sweep(
    tokens: int,
    num_codes: int,
    dim: int,
    k: int,
    sizes: list[int],
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    cases = {cs: Case(tokens, num_codes, dim, k, 1, device, chunk_size=cs) for cs in sizes}
    base = Case(tokens, num_codes, dim, k, 1, device)
    fns: dict[str, Callable[[], object]] = {"floor": base.floor}
    fns.update({str(cs): c.ours for cs, c in cases.items()})
    secs = time_interleaved(fns, repeats, device=device)
    mem = {str(cs): peak_extra_bytes(c.ours, device) for cs, c in cases.items()}
    return {"seconds": secs, "peak_bytes": mem}


def faiss_search(
    tokens: int, num_codes: int, dim: int, k: int, repeats: int, device: torch.device
) -> dict[str, Any] | None:
    """Eval-mode forward (inference): exact torch search vs FAISS flat and IVF indexes."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    case = Case(tokens, num_codes, dim, k, 1, device)
    x = case.x.detach()
    torch_layer = case.layer.eval()
    flat = CodebookLayer(dim, num_codes, k, seed=0).eval()
    flat.load_state_dict(torch_layer.state_dict())
    flat.build_index()
    nlist = max(1, int(4 * num_codes**0.5))
    ivf = CodebookLayer(dim, num_codes, k, seed=0).eval()
    ivf.load_state_dict(torch_layer.state_dict())
    t0 = time.perf_counter()
    ivf.build_index(nlist=nlist, nprobe=16)
    build = time.perf_counter() - t0

    def run(layer: CodebookLayer) -> Callable[[], object]:
        def f() -> None:
            with torch.no_grad():
                layer(x)

        return f

    secs = time_interleaved(
        {"torch": run(torch_layer), "faiss_flat": run(flat), "faiss_ivf": run(ivf)}, repeats
    )
    with torch.no_grad():
        exact = torch_layer(x).codes
        same_flat = bool(torch.equal(flat(x).codes, exact))
        recall_ivf = float((ivf(x).codes[:, :1] == exact[:, :1]).float().mean())
    return {
        "tokens": tokens,
        "num_codes": num_codes,
        "dim": dim,
        "k": k,
        "seconds": secs,
        "flat_equals_exact": same_flat,
        "ivf_nlist": nlist,
        "ivf_nprobe": 16,
        "ivf_build_seconds": build,
        "ivf_top1_agreement": recall_ivf,
    }


def compiled(
    tokens: int, num_codes: int, dim: int, k: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    case = Case(tokens, num_codes, dim, k, 1, device)
    layer = case.layer
    comp = torch.compile(layer)

    def run_comp() -> None:
        layer.codebook.grad = None
        case.x.grad = None
        res = comp(case.x)
        case._backward(res.output, res.loss)

    t0 = time.perf_counter()
    run_comp()
    compile_s = time.perf_counter() - t0
    secs = time_interleaved({"eager": case.ours, "compiled": run_comp}, repeats)
    with torch.no_grad():
        same = bool(torch.equal(comp(case.x).codes, layer(case.x).codes))
    return {"seconds": secs, "compile_seconds": compile_s, "same_codes": same}


def print_compile(comp: dict[str, Any], tokens: int) -> None:
    s = comp["seconds"]
    print_table(
        ["torch.compile", "s"],
        [
            ["eager", f"{s['eager']:.3f}"],
            ["compiled", f"{s['compiled']:.3f}"],
            ["compile time (first call)", f"{comp['compile_seconds']:.1f}"],
            ["same codes as eager", str(comp["same_codes"])],
        ],
        f"torch.compile(layer), forward + backward, {tokens:,} tokens",
    )


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(layer)")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only the torch.compile comparison, merged into the saved layer section",
    )
    ap.add_argument("--no-peers", action="store_true", help="skip vector-quantize-pytorch")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="only the machine peak and the key case's floor ratios, merged into the section",
    )
    ap.add_argument("--breakdown", action="store_true",
                    help="only the fp32 / bf16 time breakdown (CPU, one thread), merged in")  # fmt: skip
    ap.add_argument("--breakdown-tokens", type=int, default=4096)
    ap.add_argument("--per-call", action="store_true",
                    help="only the small-layer per-call profile and the small-call path on/off")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.tiny else 3)
    key = dict(KEY)
    if args.tiny:
        key = {"tokens": 512, "num_codes": 1000, "dim": 32, "k": 8}
    issue2 = (512, 1000, 32) if args.tiny else (16_384, 10_000, 64)
    print(f"bench_layer on {machine()}", flush=True)
    if args.per_call:
        pc = per_call(repeats if args.repeats else (1 if args.tiny else 15), args.tiny)
        update_section(None if args.tiny else args.results, "layer", {"per_call": pc})
        return pc
    if args.breakdown:
        bd = breakdown(256 if args.tiny else args.breakdown_tokens, key["num_codes"], key["dim"],
                       8, repeats)  # fmt: skip
        update_section(None if args.tiny else args.results, "layer", {"breakdown": bd})
        return bd
    if args.quick:
        fl = floor_case({**key, "k": 8}, repeats, device)
        keys = ("compute_floor_ratio", "compute_floor_ratio_bf16", "bf16_vs_fp32",
                "bf16_code_agreement")  # fmt: skip
        update_section(args.results, "layer", {"floor": fl, **{k: fl[k] for k in keys}})
        return fl
    if args.compile_only:
        tokens = key["tokens"] if args.tiny else 16_384
        comp = compiled(tokens, key["num_codes"], key["dim"], 8, repeats, device)
        print_compile(comp, tokens)
        update_section(args.results, "layer", {"compile": comp})
        return {"compile": comp}

    fl = floor_case({**key, "k": 8}, repeats, device)
    cases = []
    for tokens, c, d in grid(args.full, args.tiny):
        cases.append(run_case(tokens, c, d, 8, 1, repeats, device, peers=not args.no_peers))
    key_case = next(
        (
            r
            for r in cases
            if (r["tokens"], r["num_codes"], r["dim"])
            == (key["tokens"], key["num_codes"], key["dim"])
        ),
        None,
    )
    if key_case is None:
        key_case = run_case(key["tokens"], key["num_codes"], key["dim"], 8, 1, repeats, device)
        cases.append(key_case)
    for r in cases:
        flops = layer_flops(r["tokens"], r["groups"], r["num_codes"], r["dim"] // r["groups"])
        r["compute_floor_ratio"] = r["seconds"]["ours"] * fl["peak_flops_fp32"] / flops
    print_table(HEADER, [case_row(r) for r in cases], "Layer forward+backward (k=8 unless said)")

    # Issue 2: 16,384 x 10,000 x 64, k=8, single and grouped 8-head (dim 512).
    tok, c, d = issue2
    single = next(
        (r for r in cases if (r["tokens"], r["num_codes"], r["dim"]) == issue2), None
    ) or run_case(tok, c, d, 8, 1, repeats, device, peers=False)
    grouped = run_case(tok, c, d * 8, 8, 8, repeats, device, peers=False)
    print_table(HEADER[:11], [case_row(single)[:11], case_row(grouped)[:11]], "Issue 2 case")

    sizes = [64, 256] if args.tiny else [512, 1024, 2048, 4096, 8192]
    sweep = chunk_sweep(
        key["tokens"] if args.tiny else 16_384,
        key["num_codes"],
        key["dim"],
        8,
        sizes,
        repeats,
        device,
    )
    s = sweep["seconds"]
    print_table(
        ["chunk_size", "ours s", "ours/floor", "peak mem"],
        [
            [cs, f"{s[cs]:.3f}", f"{s[cs] / s['floor']:.2f}", fmt_bytes(sweep["peak_bytes"][cs])]
            for cs in map(str, sizes)
        ],
        f"Chunk-size sweep ({'tiny' if args.tiny else '16,384'} tokens, C={key['num_codes']:,}, D={key['dim']}, k=8)",
    )

    fa = (
        faiss_search(
            key["tokens"] if args.tiny else 16_384, key["num_codes"], key["dim"], 8, repeats, device
        )
        if device.type == "cpu"
        else None
    )
    if fa:
        s = fa["seconds"]
        print_table(
            ["inference search", "s", "vs torch", "note"],
            [
                ["torch exact (ours)", f"{s['torch']:.3f}", "1.00x", ""],
                [
                    "faiss flat (exact)",
                    f"{s['faiss_flat']:.3f}",
                    f"{s['torch'] / s['faiss_flat']:.2f}x",
                    f"same codes: {fa['flat_equals_exact']}",
                ],
                [
                    "faiss IVF",
                    f"{s['faiss_ivf']:.3f}",
                    f"{s['torch'] / s['faiss_ivf']:.2f}x",
                    f"nlist={fa['ivf_nlist']}, nprobe=16, top-1 agreement {fa['ivf_top1_agreement']:.3f}",
                ],
            ],
            "Eval-mode forward with a FAISS index (16,384 tokens, k=8)",
        )
    comp = None
    if args.compile:
        comp = compiled(16_384, key["num_codes"], key["dim"], 8, repeats, device)
        print_compile(comp, 16_384)

    ks, km, kc = key_case["seconds"], key_case["peak_bytes"], key_case["cpu_seconds"]
    result: dict[str, Any] = {
        "key_case": key,
        "ratio_to_matmul_floor": ks["ours"] / ks["floor"],
        "speedup_vs_dense": ks["dense"] / ks["ours"],
        "memory_ratio_vs_dense": km["ours"] / max(km["dense"], 1),
        "cpu_time_ratio_to_matmul_floor": kc["ours"] / kc["floor"],
        "cpu_time_speedup_vs_dense": kc["dense"] / kc["ours"],
        "compute_floor_ratio": fl["compute_floor_ratio"],
        "compute_floor_ratio_bf16": fl["compute_floor_ratio_bf16"],
        "bf16_vs_fp32": fl["bf16_vs_fp32"],
        "bf16_code_agreement": fl["bf16_code_agreement"],
        "floor": fl,
        "vq_k1_over_ours_k1_time": (ks["vq_k1"] / ks["ours_k1"]) if "vq_k1" in ks else None,
        "issue2": {"single": single, "grouped_8_heads": grouped},
        "cases": cases,
        "chunk_sweep": sweep,
        "faiss": fa,
        "compile": comp,
        "repeats": repeats,
        "machine": machine(),
    }
    print(
        f"\nkey case {key}: ours/floor = {result['ratio_to_matmul_floor']:.2f} (target <= 1.5), "
        f"speedup vs dense = {result['speedup_vs_dense']:.2f}x (target > 1), "
        f"memory vs dense = {result['memory_ratio_vs_dense']:.3f} (target <= 0.25)"
    )
    save_section(args.results, "layer", result)
    return result


if __name__ == "__main__":
    main()
