"""Ours side by side with the paper's own code (PyPI ``codebook-features`` 0.1.2), interleaved.

The reference runs in its own process under ``.venv-ref/bin/python`` (``make venv-ref``; it
needs transformers 4.34), driven by ``reference_driver.py`` over a pipe: each repeat runs ours
here, then the reference there (the other process idles meanwhile), so machine load falls on
both alike. Medians over ``--repeats``; wall and process CPU time.

- layer: one codebook layer, forward + backward in training mode, on the issue's four cases.
  Both with an input LayerNorm, a cosine ranking (the reference's inner-product snap ranks by
  ``x.c/|c|``), the mean of the k codes, and the reconstruction gradient to the codes (the
  reference's ``aeloss``; ours ``recon_weight=1``). The reference's metric logging is off (its
  fastest setting and its ``CodebookModel`` default).
- memory: peak tensor bytes of one layer forward + backward (``common.peak_extra_bytes``).
- train: a whole training step (forward with labels, backward, AdamW over every parameter) of
  a GPT-NeoX codebook model, and of the bare model (the two transformers versions' own model
  code differs in speed, so the bare step shows how much of a gap is not the codebooks).

    python benchmarks/bench_reference.py           # the issue's cases (minutes on 2 cores)
    python benchmarks/bench_reference.py --tiny    # seconds; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Both processes wait passively (the policy codebook-lens runs under): each idles while the
# other is timed, and OpenMP's default spin-wait of the idle one would take the cores from the
# timed one (measured: the Pythia-like codebook step 0.949 s spinning, 0.681 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    fmt_bytes,
    machine,
    peak_extra_bytes,
    print_table,
    save_section,
)

from codebook_lens import CodebookConfig, CodebookLayer, attach_codebooks  # noqa: E402

HERE = Path(__file__).resolve().parent
REF_PYTHON = HERE.parent / ".venv-ref" / "bin" / "python"

LAYER_CASES: dict[str, dict[str, int]] = {
    "32k_x1_d64_C10k_k8": {"tokens": 32_768, "groups": 1, "head_dim": 64, "num_codes": 10_000, "k": 8},
    "2k_x16_d64_C10k_k8": {"tokens": 2048, "groups": 16, "head_dim": 64, "num_codes": 10_000, "k": 8},
    "2080_x4_d16_C1k_k1": {"tokens": 2080, "groups": 4, "head_dim": 16, "num_codes": 1000, "k": 1},
    "8k_x8_d64_C10k_k8": {"tokens": 8192, "groups": 8, "head_dim": 64, "num_codes": 10_000, "k": 8},
}  # fmt: skip
"""The issue's cases: one 32k-token codebook, Pythia-410M heads, the FSM demo's heads, 8 heads."""
MEMORY_CASE = "32k_x1_d64_C10k_k8"

TRAIN_CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's TokFSM model: GPT-NeoX 4 x 128, 4 heads, MLP 512, 11 tokens, 128-token
    # sequences; group codebooks on the heads and one on each MLP output, C=1,000, k=1.
    "tokfsm": {
        "layers": 4, "width": 128, "heads": 4, "mlp": 512, "vocab": 11, "batch": 16, "seq": 128,
        "placements": ["attn_heads", "mlp_out"], "codebook_at": ["attn_preproj", "mlp"],
        "num_codes": 1000, "k": 1,
    },
    # Pythia-410M's blocks (width 1,024, 16 heads), 2 of them, head codebooks C=10,000, k=8;
    # a 4,096-token vocabulary and one 512-token sequence keep a step within seconds here.
    "pythia_like": {
        "layers": 2, "width": 1024, "heads": 16, "mlp": 4096, "vocab": 4096, "batch": 1,
        "seq": 512, "placements": ["attn_heads"], "codebook_at": ["attn_preproj"],
        "num_codes": 10_000, "k": 8,
    },
}  # fmt: skip

TINY_LAYER = {
    "256_x1_d16_C300_k2": {"tokens": 256, "groups": 1, "head_dim": 16, "num_codes": 300, "k": 2},
    "64_x4_d8_C100_k1": {"tokens": 64, "groups": 4, "head_dim": 8, "num_codes": 100, "k": 1},
}
TINY_TRAIN = {
    "tiny": {
        "layers": 1, "width": 32, "heads": 2, "mlp": 64, "vocab": 16, "batch": 2, "seq": 16,
        "placements": ["attn_heads", "mlp_out"], "codebook_at": ["attn_preproj", "mlp"],
        "num_codes": 64, "k": 1,
    }
}  # fmt: skip


class Reference:
    """The reference driver process; ``ask`` sends one command and returns its answer."""

    def __init__(self, python: Path, threads: int) -> None:
        env = {**os.environ, "BENCH_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "reference_driver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                data: dict[str, Any] = json.loads(line[3:])
                if "error" in data:
                    raise RuntimeError(f"reference driver, {op}: {data['error']}")
                return data
        raise RuntimeError(f"reference driver exited (code {self.proc.wait()}) during {op!r}")

    def close(self) -> None:
        try:
            self.ask("quit")
        finally:
            self.proc.wait(timeout=60)


# --------------------------------------------------------------------------------- ours
def our_layer(spec: dict[str, int]) -> Callable[[], None]:
    n, g, d = spec["tokens"], spec["groups"], spec["head_dim"]
    layer = CodebookLayer(
        g * d, spec["num_codes"], spec["k"], groups=g, layer_norm=True, reduction="mean", seed=0
    ).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, g * d, generator=gen).requires_grad_(True)
    grad = torch.randn(1, n, g * d, generator=gen)
    one = torch.ones(())

    def run() -> None:
        x.grad = layer.codebook.grad = None
        res = layer(x)
        torch.autograd.backward((res.output, res.loss), (grad, one))

    return run


def our_train(spec: dict[str, Any], codebooks: bool) -> Callable[[], None]:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["width"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=spec["mlp"],
        max_position_embeddings=max(spec["seq"], 8),
    )
    model: Any = AutoModelForCausalLM.from_config(cfg)
    if codebooks:
        model = attach_codebooks(
            model,
            CodebookConfig(
                num_codes=spec["num_codes"],
                k=spec["k"],
                placements=list(spec["placements"]),
                layer_norm=True,
                reduction="mean",
            ),
        )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
    codebook_loss = getattr(model, "codebook_loss", None)

    def run() -> None:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (codebook_loss() if codebook_loss is not None else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


# ------------------------------------------------------------------------------ timing
def interleaved(
    ours: dict[str, Callable[[], None]], ref: Reference, ref_names: list[str], repeats: int
) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of our functions and the reference's named runs, in turn."""
    samples: dict[str, dict[str, list[float]]] = {
        n: {"wall": [], "cpu": []} for n in [*ours, *(f"ref:{r}" for r in ref_names)]
    }
    for rep in range(repeats + 1):  # the first round warms up
        for name, fn in ours.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if rep:
                samples[name]["wall"].append(time.perf_counter() - t0)
                samples[name]["cpu"].append(time.process_time() - c0)
        for rname in ref_names:
            got = ref.ask("run", name=rname)
            if rep:
                samples[f"ref:{rname}"]["wall"].append(got["wall"])
                samples[f"ref:{rname}"]["cpu"].append(got["cpu"])
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def run_layers(
    cases: dict[str, dict[str, int]], ref: Reference, repeats: int, memory: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in cases.items():
        ours = our_layer(spec)
        ref.ask("layer", name=name, **spec)
        t = interleaved({"ours": ours}, ref, [name], repeats)
        row: dict[str, Any] = {**spec, "ours": t["ours"], "reference": t[f"ref:{name}"]}
        row["speedup"] = row["reference"]["wall"] / row["ours"]["wall"]
        row["cpu_speedup"] = row["reference"]["cpu"] / row["ours"]["cpu"]
        if memory:
            row["ours_peak_bytes"] = peak_extra_bytes(ours)
            row["reference_peak_bytes"] = ref.ask("memory", name=name)["peak_bytes"]
        ref.ask("drop", name=name)
        out[name] = row
        print(
            f"  layer {name}: ours {row['ours']['wall']:.3f} s, reference "
            f"{row['reference']['wall']:.3f} s -> {row['speedup']:.2f}x "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return out


def run_train(configs: dict[str, dict[str, Any]], ref: Reference, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in configs.items():
        ref_spec = {k: v for k, v in spec.items() if k != "placements"}
        ref.ask("train", name=f"{name}:cb", **ref_spec)
        ref.ask("train", name=f"{name}:base", **{**ref_spec, "codebook_at": []})
        ours = {"ours": our_train(spec, True), "ours_base": our_train(spec, False)}
        t = interleaved(ours, ref, [f"{name}:cb", f"{name}:base"], repeats)
        ref.ask("drop", name=f"{name}:cb")
        ref.ask("drop", name=f"{name}:base")
        row = {
            "config": spec,
            "tokens_per_step": spec["batch"] * spec["seq"],
            "ours": t["ours"],
            "reference": t[f"ref:{name}:cb"],
            "ours_base": t["ours_base"],
            "reference_base": t[f"ref:{name}:base"],
        }
        row["speedup"] = row["reference"]["wall"] / row["ours"]["wall"]
        row["cpu_speedup"] = row["reference"]["cpu"] / row["ours"]["cpu"]
        # Seconds the codebooks add to a step on each side (model code differs between the
        # transformers versions, so this isolates what each library's codebooks cost).
        row["ours_codebook_s"] = row["ours"]["wall"] - row["ours_base"]["wall"]
        row["reference_codebook_s"] = row["reference"]["wall"] - row["reference_base"]["wall"]
        out[name] = row
        print(
            f"  train {name}: ours {row['ours']['wall']:.3f} s (base {row['ours_base']['wall']:.3f}),"
            f" reference {row['reference']['wall']:.3f} s (base "
            f"{row['reference_base']['wall']:.3f}) -> {row['speedup']:.2f}x",
            flush=True,
        )
    return out


def print_tables(result: dict[str, Any]) -> None:
    layers, train = result["layer"], result["train"]
    rows = []
    for r in layers.values():
        mem = (
            [fmt_bytes(r["ours_peak_bytes"]), fmt_bytes(r["reference_peak_bytes"])]
            if "ours_peak_bytes" in r
            else ["-", "-"]
        )
        rows.append(
            [
                f"{r['tokens']:,} x {r['groups']} x {r['head_dim']}, C={r['num_codes']:,}, "
                f"k={r['k']}",
                f"{r['ours']['wall']:.3f}",
                f"{r['reference']['wall']:.3f}",
                f"{r['speedup']:.2f}x",
                f"{r['cpu_speedup']:.2f}x",
                *mem,
            ]
        )
    print_table(
        ["tokens x groups x head dim", "ours s", "reference s", "speedup", "CPU-time speedup"]
        + ["ours peak", "reference peak"],
        rows,
        "Codebook layer, forward + backward (training mode), interleaved medians",
    )
    rows = [
        [
            name,
            f"{r['ours']['wall']:.3f}",
            f"{r['reference']['wall']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['cpu_speedup']:.2f}x",
            f"{r['ours_base']['wall']:.3f}",
            f"{r['reference_base']['wall']:.3f}",
            f"{r['ours_codebook_s']:.3f}",
            f"{r['reference_codebook_s']:.3f}",
        ]
        for name, r in train.items()
    ]
    print_table(
        ["config", "ours s", "reference s", "speedup", "CPU-time speedup", "ours base s"]
        + ["reference base s", "ours codebooks s", "reference codebooks s"],
        rows,
        "Training step (forward, backward, AdamW), codebook model and bare model",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument(
        "--ref-python",
        default=os.environ.get("CODEBOOK_LENS_REF_PYTHON", str(REF_PYTHON)),
        help="python of the reference venv (make venv-ref)",
    )
    ap.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    args = ap.parse_args(argv)
    ref_python = Path(args.ref_python)
    if not ref_python.is_file():
        print(
            f"bench_reference: {ref_python} not found; run `make venv-ref` to install the "
            "reference (codebook-features 0.1.2) in its own venv. Nothing measured.",
            flush=True,
        )
        return {}
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.tiny else 3)
    cases = TINY_LAYER if args.tiny else LAYER_CASES
    configs = TINY_TRAIN if args.tiny else TRAIN_CONFIGS
    memory_case = next(iter(cases)) if args.tiny else MEMORY_CASE
    info = machine()
    print(f"bench_reference on {info}", flush=True)
    ref = Reference(ref_python, args.threads)
    try:
        layers = run_layers(cases, ref, repeats, memory=True)
        train = {} if args.no_train else run_train(configs, ref, repeats)
    finally:
        ref.close()
    mem = layers[memory_case]
    result: dict[str, Any] = {
        "layer_speedup": {n: r["speedup"] for n, r in layers.items()},
        "layer_speedup_min": min(r["speedup"] for r in layers.values()),
        "train_speedup_min": min((r["speedup"] for r in train.values()), default=None),
        "layer_cpu_speedup": {n: r["cpu_speedup"] for n, r in layers.items()},
        "memory_ratio": mem["ours_peak_bytes"] / max(mem["reference_peak_bytes"], 1),
        "memory_case": memory_case,
        "train_speedup": {n: r["speedup"] for n, r in train.items()},
        "train_cpu_speedup": {n: r["cpu_speedup"] for n, r in train.items()},
        "layer": layers,
        "train": train,
        "repeats": repeats,
        "machine": info,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    print_tables(result)
    print(
        f"\nlayer speedup min {min(result['layer_speedup'].values()):.2f}x (target >= 4), "
        f"memory ratio {result['memory_ratio']:.3f} at {memory_case} (target <= 0.25)"
        + (
            f", train speedup min {min(result['train_speedup'].values()):.2f}x (target >= 2)"
            if train
            else ""
        )
    )
    save_section(args.results, "reference", result)
    return result


if __name__ == "__main__":
    main()
