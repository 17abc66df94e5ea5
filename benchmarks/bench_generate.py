"""Generation tokens/s with and without codebooks (same model, same prompts, KV cache on).

A GPT-2-style model built locally (random weights: speed does not depend on them) generates
greedily with codebooks on and, through ``CodebookModel.disabled()``, off; the two are timed
round-robin. Configurations: the paper's LM placement (a codebook per attention head, C=10k,
k=8) and the FSM one (heads + MLP outputs, C=1k, k=1).

    python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --tiny    # seconds; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, machine, print_table, save_section, time_wall_cpu  # noqa: E402

from codebook_lens import CodebookConfig, attach_codebooks  # noqa: E402

SETUPS = {
    "lm": {"placements": ["attn_heads"], "num_codes": 10_000, "k": 8},
    "fsm": {"placements": ["attn_heads", "mlp_out"], "num_codes": 1000, "k": 1},
}
IVF = {"nlist": 100, "nprobe": 8}
"""The ``lm+ivf`` row: the LM setup searching approximate FAISS IVF indexes (eval only)."""
KEY = ("lm", 8)
"""results.json's headline: the LM setup at batch 8."""


def _has_faiss() -> bool:
    try:
        import faiss  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def build(layers: int, width: int, heads: int, vocab: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--new-tokens", type=int, default=32)
    # Decoding runs tiny ops; on a shared 2-core machine two OpenMP threads spin against other
    # processes (measured 13x slower than one thread for the base model alone).
    ap.set_defaults(threads=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tiny:
        layers, width, heads, vocab, prompt, new = 2, 64, 8, 100, 4, 4
        batches, setups = [2], {"lm": dict(SETUPS["lm"], num_codes=500)}
    else:
        layers, width, heads, vocab, prompt, new = 4, 512, 8, 4096, 16, args.new_tokens
        batches, setups = [1, 8], dict(SETUPS)
        if device.type == "cpu" and _has_faiss():
            setups["lm+ivf"] = dict(SETUPS["lm"])
    repeats = args.repeats or (1 if args.tiny else 3)
    print(f"bench_generate on {machine()}", flush=True)

    results = []
    for name, setup in setups.items():
        model = attach_codebooks(
            build(layers, width, heads, vocab),
            CodebookConfig(**setup),  # type: ignore[arg-type]
        ).to(device)
        model.eval()
        if name.endswith("+ivf"):
            for layer in model.codebooks.values():
                layer.build_index(**IVF)
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(1, vocab, (batch, prompt), generator=gen).to(device)
            kw = {
                "max_new_tokens": new,
                "min_new_tokens": new,
                "do_sample": False,
                "pad_token_id": 0,
            }

            def with_codes(model: Any = model, ids: torch.Tensor = ids, kw: Any = kw) -> None:
                with torch.no_grad():
                    out = model.generate(ids, **kw)
                assert out.shape[1] == ids.shape[1] + kw["max_new_tokens"]

            def base(model: Any = model, ids: torch.Tensor = ids, kw: Any = kw) -> None:
                with torch.no_grad(), model.disabled():
                    model.generate(ids, **kw)

            secs, cpu = time_wall_cpu(
                {"base": base, "codebooks": with_codes}, repeats, device=device
            )
            tok = batch * new
            results.append(
                {
                    "setup": name,
                    **setup,
                    "batch": batch,
                    "new_tokens": new,
                    "base_tokens_per_s": tok / secs["base"],
                    "codebook_tokens_per_s": tok / secs["codebooks"],
                    "ratio": secs["base"] / secs["codebooks"],
                    "cpu_time_ratio": cpu["base"] / cpu["codebooks"],
                }
            )
    rows = [
        [
            f"{r['setup']} ({'+'.join(r['placements'])}, C={r['num_codes']:,}, k={r['k']})"
            + (f", IVF nlist={IVF['nlist']} nprobe={IVF['nprobe']}" if "ivf" in r["setup"] else ""),
            str(r["batch"]),
            f"{r['base_tokens_per_s']:.1f}",
            f"{r['codebook_tokens_per_s']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['cpu_time_ratio']:.2f}",
        ]
        for r in results
    ]
    print_table(
        ["setup", "batch", "base tok/s", "codebooks tok/s", "ratio", "cpu-time ratio"],
        rows,
        f"Greedy generation, {layers} layers x {width} wide x {heads} heads, "
        f"{prompt}-token prompt + {new} new tokens",
    )
    key = next((r for r in results if (r["setup"], r["batch"]) == KEY), results[-1])
    result = {
        "key_case": {"setup": key["setup"], "batch": key["batch"]},
        "codebook_vs_base_throughput": key["ratio"],
        "cpu_time_codebook_vs_base_throughput": key["cpu_time_ratio"],
        "model": {"layers": layers, "width": width, "heads": heads, "vocab": vocab},
        "cases": results,
        "machine": machine(),
    }
    save_section(args.results, "generate", result)
    return result


if __name__ == "__main__":
    main()
