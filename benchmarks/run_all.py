"""Run every benchmark (``make bench``), each in its own process, then print the headline keys.

Scripts: bench_layer, bench_groups, bench_generate, bench_train (and its ``--fsm`` run),
bench_reference (needs ``make venv-ref``; without it, it says so and measures nothing) and
bench_search, when they exist. Each merges its section into ``--results`` (default ``benchmarks/results.json``);
a script that does not know ``--results`` is run without it and keeps its own output.

    python benchmarks/run_all.py                    # default subsets
    python benchmarks/run_all.py --full             # whole grids (long on 2 cores)
    python benchmarks/run_all.py --only layer groups
    python benchmarks/run_all.py --tiny --results /tmp/r.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ("layer", "groups", "generate", "train", "reference", "search")
HEADLINE = {
    "layer": (
        "compute_floor_ratio",
        "compute_floor_ratio_bf16",
        "bf16_vs_fp32",
        "bf16_code_agreement",
        "ratio_to_matmul_floor",
        "speedup_vs_dense",
        "memory_ratio_vs_dense",
    ),
    "groups": ("speedup_vs_loop", "min_speedup_vs_loop"),
    "train": (
        "codebook_vs_base_throughput",
        "fsm_codebook_vs_base_throughput",
        "codebook_overhead",
    ),
    "reference": ("layer_speedup_min", "memory_ratio", "train_speedup_min"),
    "generate": ("codebook_vs_base_throughput",),
    "search": ("seconds_1m_tokens", "speedup_vs_loop"),
}
TARGETS = {
    "layer.compute_floor_ratio": "<= 1.5",
    "layer.compute_floor_ratio_bf16": "<= 1.0",
    "layer.bf16_code_agreement": ">= 0.999",
    "layer.bf16_vs_fp32": "<= 0.5 (where bf16 units exist)",
    "groups.min_speedup_vs_loop": ">= 1.0",
    "train.fsm_codebook_vs_base_throughput": ">= 0.6",
    "train.codebook_overhead": "<= 0.5",
    "reference.layer_speedup_min": ">= 4",
    "reference.memory_ratio": "<= 0.25",
    "reference.train_speedup_min": ">= 2",
    "layer.ratio_to_matmul_floor": "<= 1.5",
    "layer.speedup_vs_dense": "> 1",
    "layer.memory_ratio_vs_dense": "<= 0.25",
    "groups.speedup_vs_loop": ">= 3 (8+ heads)",
    "train.codebook_vs_base_throughput": ">= 0.6",
    "search.seconds_1m_tokens": "< 2",
    "search.speedup_vs_loop": ">= 10",
}


def script_args(path: Path, args: argparse.Namespace) -> list[str]:
    """Flags for one script, passing only those its source declares."""
    src = path.read_text(encoding="utf-8")
    if "add_common_args" in src:  # the shared flags from common.py
        src += " --tiny --full --results"
    out = []
    if args.tiny and "--tiny" in src:
        out.append("--tiny")
    if args.full and "--full" in src:
        out.append("--full")
    if "--results" in src:
        out += ["--results", args.results]
    if args.compile and path.stem == "bench_layer":
        out.append("--compile")
    return out


def derive(results: dict[str, Any]) -> None:
    """Fill headline keys that a script stores in its own layout (in place).

    bench_train.py writes ``bench_train.results[name].vs_base``; the headline is the worst
    joint-training codebook configuration.
    """
    train = results.get("bench_train")
    if isinstance(train, dict):  # always re-derived, so a fresh bench_train run is reflected
        ratios = [
            v["vs_base"]
            for k, v in train.get("results", {}).items()
            if k.startswith("codebook C=") and isinstance(v, dict) and "vs_base" in v
        ]
        derived: dict[str, Any] = {"from": "bench_train"}
        if ratios:
            derived["codebook_vs_base_throughput"] = min(ratios)
        fsm = train.get("fsm")
        if isinstance(fsm, dict) and "codebook_vs_base_throughput" in fsm:
            derived["fsm_codebook_vs_base_throughput"] = fsm["codebook_vs_base_throughput"]
        over = train.get("overhead")
        if isinstance(over, dict) and "codebook_overhead" in over:
            derived["codebook_overhead"] = over["codebook_overhead"]
        if len(derived) > 1:
            results["train"] = derived


def headline(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for section in ORDER:
        for key in HEADLINE[section]:
            value = (
                results.get(section, {}).get(key)
                if isinstance(results.get(section), dict)
                else None
            )
            name = f"{section}.{key}"
            shown = "missing" if value is None else f"{value:.3f}"
            rows.append([name, shown, TARGETS.get(name, "")])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--full", action="store_true", help="whole grids")
    ap.add_argument("--compile", action="store_true", help="bench_layer: also torch.compile")
    ap.add_argument("--only", nargs="*", choices=ORDER, default=None, help="run these only")
    ap.add_argument("--results", default=str(HERE / "results.json"), help="results JSON")
    args = ap.parse_args(argv)

    failed = []
    for name in args.only or ORDER:
        path = HERE / f"bench_{name}.py"
        if not path.is_file():
            print(f"\n== bench_{name}.py: not present, skipped", flush=True)
            continue
        # bench_train runs three times: its model grid, the FSM demo's own models, the overhead.
        for extra in ([], ["--fsm"], ["--overhead"]) if name == "train" else ([],):
            cmd = [sys.executable, str(path), *script_args(path, args), *extra]
            print(f"\n== {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"== bench_{name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)

    results: dict[str, Any] = {}
    if args.results and Path(args.results).is_file():
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    derive(results)
    if results and args.results and not args.tiny:
        sys.path.insert(0, str(HERE))
        from common import save_section

        if "train" in results:
            save_section(args.results, "train", results["train"])
    rows = headline(results)
    widths = [max(len(r[i]) for r in rows + [["key", "value", "target"]]) for i in range(3)]
    print("\nHeadline numbers (" + (args.results or "not saved") + ")\n")
    for r in [["key", "value", "target"], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
