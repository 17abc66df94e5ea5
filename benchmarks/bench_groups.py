"""Grouped per-head codebooks: one batched layer vs a Python loop of one layer per head.

Both sides do the same work (forward + backward, k codes per head from C codes of width
``head_dim``): ``batched`` is one ``CodebookLayer(groups=heads)``, ``loop`` is ``heads``
separate ``CodebookLayer``s called on each head's slice in a Python loop, outputs concatenated.
Cases run from decode-sized batches (where per-call overhead dominates) to 32k-token training
batches (where the similarity matmul dominates and batching can only save overhead). ``floor``
is the bare similarity matmul of all heads (forward only): when the loop itself runs within
``loop/floor`` of it, no batched version can beat the loop by more than that ratio.

    python benchmarks/bench_groups.py           # default cases
    python benchmarks/bench_groups.py --tiny    # seconds; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    machine,
    print_table,
    save_section,
    similarity_floor,
    time_wall_cpu,
)

from codebook_lens import CodebookLayer  # noqa: E402

KEY = {"heads": 8, "tokens": 32_768, "num_codes": 10_000, "head_dim": 64, "k": 8}
"""results.json's ``speedup_vs_loop`` case (issue 8's defaults: C=10k, 32k tokens, D=64, k=8)."""


def cases(full: bool, tiny: bool) -> list[dict[str, int]]:
    if tiny:
        return [{"heads": 8, "tokens": 64, "num_codes": 300, "head_dim": 8, "k": 2}]
    out = [
        # generation: one new token per sequence, batch 8
        {"heads": 8, "tokens": 8, "num_codes": 10_000, "head_dim": 64, "k": 8},
        {"heads": 16, "tokens": 8, "num_codes": 10_000, "head_dim": 64, "k": 8},
        # FSM-sized training batch (issue 3: 4 layers, C=1000, k=1; 8+ heads here)
        {"heads": 8, "tokens": 2048, "num_codes": 1000, "head_dim": 32, "k": 1},
        {"heads": 16, "tokens": 2048, "num_codes": 1000, "head_dim": 32, "k": 1},
        # LM training batches
        {"heads": 8, "tokens": 4096, "num_codes": 10_000, "head_dim": 64, "k": 8},
        dict(KEY),
    ]
    if full:
        out += [
            {"heads": 16, "tokens": 32_768, "num_codes": 10_000, "head_dim": 64, "k": 8},
            {"heads": 32, "tokens": 512, "num_codes": 1000, "head_dim": 32, "k": 8},
        ]
    return out


def run(case: dict[str, int], repeats: int, device: torch.device) -> dict[str, Any]:
    h, n, c, d, k = (case[key] for key in ("heads", "tokens", "num_codes", "head_dim", "k"))
    batched = CodebookLayer(h * d, c, k, groups=h, seed=0).to(device).train()
    singles = []
    for i in range(h):
        layer = CodebookLayer(d, c, k, seed=0).to(device).train()
        with torch.no_grad():
            layer.codebook.copy_(batched.codebook[i : i + 1])
        singles.append(layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h * d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(n, h * d, generator=gen).to(device)
    one = torch.ones((), device=device)

    def run_batched() -> torch.Tensor:
        batched.codebook.grad = x.grad = None
        res = batched(x)
        torch.autograd.backward((res.output, res.loss), (g, one))
        return res.codes

    def run_loop() -> torch.Tensor:
        x.grad = None
        outs, losses, codes = [], [], []
        for i, layer in enumerate(singles):
            layer.codebook.grad = None
            res = layer(x[:, i * d : (i + 1) * d])
            outs.append(res.output)
            losses.append(res.loss)
            codes.append(res.codes)
        out = torch.cat(outs, dim=-1)
        loss = torch.stack(losses).mean()
        torch.autograd.backward((out, loss), (g, one))
        return torch.stack(codes, dim=1)

    def floor() -> torch.Tensor:  # what any implementation, batched or looped, must spend
        return similarity_floor(x, batched.codebook)

    same = bool(torch.equal(run_batched(), run_loop()))
    fns: dict[str, Callable[[], object]] = {
        "floor": floor,
        "batched": run_batched,
        "loop": run_loop,
    }
    secs, cpu = time_wall_cpu(fns, repeats, device=device)
    return {
        **case,
        "seconds": secs,
        "cpu_seconds": cpu,
        "speedup": secs["loop"] / secs["batched"],
        "batched_over_floor": secs["batched"] / secs["floor"],
        "loop_over_floor": secs["loop"] / secs["floor"],
        "cpu_speedup": cpu["loop"] / cpu["batched"],
        "same_codes": same,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"bench_groups on {machine()}", flush=True)
    todo = cases(args.full, args.tiny)
    results = []
    for case in todo:
        reps = args.repeats or (1 if args.tiny else (20 if case["tokens"] <= 8 else 3))
        results.append(run(case, reps, device))
    rows = [
        [
            f"{r['heads']} x {r['tokens']:,} x {r['num_codes']:,} x {r['head_dim']}, k={r['k']}",
            f"{r['seconds']['batched'] * 1e3:.1f}",
            f"{r['seconds']['loop'] * 1e3:.1f}",
            f"{r['seconds']['floor'] * 1e3:.1f}",
            f"{r['loop_over_floor']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['cpu_speedup']:.2f}x",
            str(r["same_codes"]),
        ]
        for r in results
    ]
    print_table(
        [
            "heads x tokens x C x head_dim",
            "batched ms",
            "loop ms",
            "floor ms",
            "loop/floor",
            "speedup",
            "cpu-time speedup",
            "same codes",
        ],
        rows,
        "Grouped codebooks, forward + backward",
    )
    key = next((r for r in results if all(r[f] == v for f, v in KEY.items())), results[-1])
    result = {
        "key_case": {f: key[f] for f in KEY},
        "speedup_vs_loop": key["speedup"],
        "cpu_time_speedup_vs_loop": key["cpu_speedup"],
        "max_speedup_vs_loop": max(r["speedup"] for r in results),
        "min_speedup_vs_loop": min(r["speedup"] for r in results),
        "min_speedup_case": {f: min(results, key=lambda r: r["speedup"])[f] for f in KEY},
        "cases": results,
        "machine": machine(),
    }
    save_section(args.results, "groups", result)
    return result


if __name__ == "__main__":
    main()
