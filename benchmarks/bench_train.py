"""Training throughput: codebook model vs its base model, same settings, side by side.

One training step = forward with labels, codebook loss, backward, gradient clipping, AdamW step
and ``model.step()`` (dead-code clock), i.e. the inner loop of ``codebook_lens.training.loop.train``
without its logging. Contenders are timed round-robin in one run (median of repeats), on random
token batches, for the default ``codebook-lens pretrain`` model (GPT-NeoX, 2 layers, width 128,
4 heads, BPE vocabulary 2048) with codebooks on every attention head (k-means init, mean of k).

Target (issue 4): codebook model >= 0.6x the base model's tokens/s.

    python benchmarks/bench_train.py            # block 128 x batch 16, C = 1024 and 4096, k = 8
    python benchmarks/bench_train.py --layers 4 --width 256 --vocab 4096   # a larger model
    python benchmarks/bench_train.py --tiny     # seconds; what the test runs
    python benchmarks/bench_train.py --fsm      # the FSM demo's base and codebook models

``--fsm`` times the FSM demo's own setup (``DemoConfig()``: GPT-2 2 x 64, 4 heads, batch 32 x 65
TokFSM sequences, head and MLP codebooks C=1,000, k=1, commitment 1.0, k-means init), the
optimizer step the demo uses (``build_optimizer``, model lr factor 0.1), and writes
``bench_train.fsm`` (read as ``train.fsm_codebook_vs_base_throughput``).

``--overhead`` times the two configurations of ``bench_reference.py`` (the paper's TokFSM model
and a Pythia-like one) without and with codebooks, and with codebooks but the layer's small-call
path off (``SMALL_CALL_ELEMENTS = 0``: every element-wise op on every thread, as before it),
interleaved; it writes ``bench_train.overhead`` (read as ``train.codebook_overhead``, the
codebook step minus the base step over the base step, worst of the two configurations).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, machine, print_table, time_wall_cpu, update_section

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.training.loop import TrainConfig, build_optimizer


def make_model(args: argparse.Namespace, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.width,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.width,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.block, 8),
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg).to(device)


def make_step(model: torch.nn.Module, ids: torch.Tensor, train_cfg: TrainConfig) -> Any:
    opt = build_optimizer(model, train_cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    codebook_loss = getattr(model, "codebook_loss", None)
    step_fn = getattr(model, "step", None)
    model.train()

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + (codebook_loss() if codebook_loss is not None else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if callable(step_fn):
            step_fn()

    return step


def fsm_steps(repeats: int, device: str) -> dict[str, Any]:
    """Base vs codebook training step of the FSM demo's models, interleaved."""
    from codebook_lens.experiments.fsm import DemoConfig, build_base_model
    from codebook_lens.experiments.fsm.data import TokFSM

    cfg = DemoConfig()
    fsm = TokFSM(cfg.fsm_config())
    ids = fsm.sample(cfg.batch_size, torch.Generator().manual_seed(0)).to(device)
    base_cfg = TrainConfig(lr=cfg.base_lr, model_lr_factor=1.0, weight_decay=0.0)
    cb_cfg = TrainConfig(lr=cfg.codebook_lr, model_lr_factor=cfg.model_lr_factor, weight_decay=0.0)
    base = build_base_model(cfg, fsm).to(device)
    model = attach_codebooks(build_base_model(cfg, fsm).to(device), cfg.codebook_config())
    steps = {"base": make_step(base, ids, base_cfg), "codebook": make_step(model, ids, cb_cfg)}
    times, cpu = time_wall_cpu(steps, repeats, warmup=2, device=device)
    tokens = ids.numel()
    ratio = times["base"] / times["codebook"]
    print_table(
        ["FSM demo model", "ms / step", "tokens / s", "vs base", "CPU ms / step", "vs base (CPU)"],
        [
            [
                name,
                f"{times[name] * 1e3:.1f}",
                f"{tokens / times[name]:,.0f}",
                f"{times['base'] / times[name]:.2f}x",
                f"{cpu[name] * 1e3:.1f}",
                f"{cpu['base'] / cpu[name]:.2f}x",
            ]
            for name in steps
        ],
        f"FSM demo training step (batch {cfg.batch_size} x {cfg.seq_len}), median of {repeats}",
    )
    return {
        "codebook_vs_base_throughput": ratio,
        "cpu_codebook_vs_base_throughput": cpu["base"] / cpu["codebook"],
        "step_s": times,
        "cpu_s": cpu,
        "tokens_per_step": tokens,
        "demo_config": {"layers": cfg.layers, "width": cfg.width, "heads": cfg.heads,
                        "num_codes": cfg.num_codes, "k": cfg.k, "batch": cfg.batch_size,
                        "seq_len": cfg.seq_len},
        "repeats": repeats,
        "machine": machine(),
    }  # fmt: skip


def overhead_steps(repeats: int, tiny: bool) -> dict[str, Any]:
    """Codebook cost of a training step over the base step, with and without the small-call
    path, for the TokFSM and Pythia-like configurations (interleaved per configuration)."""
    import bench_reference

    import codebook_lens.model.layer as layer_module

    configs = bench_reference.TINY_TRAIN if tiny else bench_reference.TRAIN_CONFIGS
    on = layer_module.SMALL_CALL_ELEMENTS

    def with_limit(fn: Any, limit: int) -> Any:
        def run() -> None:
            layer_module.SMALL_CALL_ELEMENTS = limit
            try:
                fn()
            finally:
                layer_module.SMALL_CALL_ELEMENTS = on

        return run

    out: dict[str, Any] = {}
    rows = []
    for name, spec in configs.items():
        cb = bench_reference.our_train(spec, True)
        steps = {"base": bench_reference.our_train(spec, False), "codebook": with_limit(cb, on),
                 "codebook, small-call path off": with_limit(cb, 0)}  # fmt: skip
        times, cpu = time_wall_cpu(steps, repeats, warmup=1)
        over = {n: (times[n] - times["base"]) / times["base"] for n in steps if n != "base"}
        over_cpu = {n: (cpu[n] - cpu["base"]) / cpu["base"] for n in steps if n != "base"}
        out[name] = {"step_s": times, "cpu_s": cpu, "codebook_overhead": over["codebook"],
                     "cpu_codebook_overhead": over_cpu["codebook"],
                     "codebook_overhead_small_call_off": over["codebook, small-call path off"]}  # fmt: skip
        for n in steps:
            rows.append([name, n, f"{times[n] * 1e3:.1f}", f"{cpu[n] * 1e3:.1f}",
                         "-" if n == "base" else f"{over[n]:.2f}",
                         "-" if n == "base" else f"{over_cpu[n]:.2f}"])  # fmt: skip
    print_table(
        ["config", "model", "ms / step", "CPU ms / step", "overhead", "overhead (CPU)"],
        rows,
        f"codebook overhead per training step (step - base) / base, median of {repeats}",
    )
    worst = max(v["codebook_overhead"] for v in out.values())
    return {"codebook_overhead": worst, "configs": out, "repeats": repeats, "machine": machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--codes", default="1024,4096", help="codebook sizes C to compare")
    ap.add_argument("--k", type=int, default=8, help="codes per head and token")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fsm", action="store_true", help="only the FSM demo's models (see above)")
    ap.add_argument("--overhead", action="store_true",
                    help="only the TokFSM and Pythia-like codebook overhead (see above)")  # fmt: skip
    args = ap.parse_args()
    if args.overhead:
        torch.set_num_threads(args.threads)
        res = overhead_steps(args.repeats or (1 if args.tiny else 5), args.tiny)
        print(f"\ncodebook overhead (worst config): {res['codebook_overhead']:.2f} (target <= 0.5)")
        if not args.tiny:
            update_section(args.results, "bench_train", {"overhead": res})
        return
    if args.fsm:
        torch.set_num_threads(args.threads)
        fsm = fsm_steps(args.repeats or (2 if args.tiny else 15), args.device)
        print(f"\nFSM demo codebook/base throughput: {fsm['codebook_vs_base_throughput']:.2f}x "
              "(target >= 0.6)")  # fmt: skip
        if not args.tiny:
            update_section(args.results, "bench_train", {"fsm": fsm})
        return
    if args.tiny:
        args.layers, args.width, args.heads, args.vocab = 1, 32, 2, 64
        args.block, args.batch, args.codes, args.k = 16, 2, "32", 2
    repeats = args.repeats or (2 if args.tiny else 7)
    torch.set_num_threads(args.threads)
    sizes = [int(c) for c in args.codes.split(",") if c]

    ids = torch.randint(
        0, args.vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(args.device)
    train_cfg = TrainConfig(lr=1e-3, model_lr_factor=0.1, weight_decay=0.01)
    steps: dict[str, Any] = {"base": make_step(make_model(args, args.device), ids, train_cfg)}
    for c in sizes:
        model = attach_codebooks(
            make_model(args, args.device),
            CodebookConfig(
                num_codes=c,
                k=args.k,
                reduction="mean",
                placements=["attn_heads"],
                dead_code_steps=100,
            ),
        )
        steps[f"codebook C={c}"] = make_step(model, ids, train_cfg)
    if sizes:  # codebooks only: the model is frozen, only codes learn
        frozen = attach_codebooks(
            make_model(args, args.device),
            CodebookConfig(
                num_codes=sizes[-1], k=args.k, reduction="mean", placements=["attn_heads"]
            ),
        )
        steps[f"codebooks only C={sizes[-1]}"] = make_step(
            frozen, ids, TrainConfig(lr=1e-3, model_lr_factor=0.0)
        )

    times, cpu = time_wall_cpu(steps, repeats, device=args.device)
    tokens = args.batch * args.block
    base_tps, base_cpu = tokens / times["base"], cpu["base"]
    rows, data = [], {}
    for name, t in times.items():
        tps = tokens / t
        rows.append(
            [
                name,
                f"{t * 1000:.1f}",
                f"{tps:,.0f}",
                f"{tps / base_tps:.2f}x",
                f"{cpu[name] * 1000:.1f}",
                f"{base_cpu / max(cpu[name], 1e-12):.2f}x",
            ]
        )
        data[name] = {
            "step_s": t,
            "cpu_s": cpu[name],
            "tokens_per_s": tps,
            "vs_base": tps / base_tps,
            "vs_base_cpu": base_cpu / max(cpu[name], 1e-12),
        }
    print_table(
        ["model", "ms / step", "tokens / s", "vs base", "CPU ms / step", "vs base (CPU)"],
        rows,
        title=(
            f"training step, GPT-NeoX {args.layers} layers x {args.width} ({args.heads} heads), "
            f"vocab {args.vocab}, batch {args.batch} x {args.block}, codebooks on all attention "
            f"heads, k={args.k}, median of {repeats} (device {args.device}, "
            f"{torch.get_num_threads()} threads)"
        ),
    )
    joint = [v for k, v in data.items() if k.startswith("codebook C=")]
    worst, worst_cpu = min(v["vs_base"] for v in joint), min(v["vs_base_cpu"] for v in joint)
    print(
        f"\ncodebook/base throughput (worst joint-training C): {worst:.2f}x wall, "
        f"{worst_cpu:.2f}x CPU time (target >= 0.6x)"
    )
    update_section(  # keeps the --fsm sub-section
        None if args.tiny else args.results,
        "bench_train",
        {
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "results"},
            "results": data,
        },
    )


if __name__ == "__main__":
    main()
