"""Two long commands started together on the same cores: how much slower is each than alone?

Runs a command (the FSM demo by default, `experiment topics` with ``--commands topics``) once
alone, then twice at the same time, each as its own ``codebook-lens`` process at its default
thread policy, and reports each concurrent run's wall time over the lone run's
(``threads.two_runs_slowdown``: the worse of the two; 2.0 is what sharing 2 cores costs a job
that used both, more means the runs hold each other up). ``--contrast`` adds the same pair with
``--threads 2`` forced in both, the configuration that used to collapse. ``--step-rates`` times
the demo's base-model training step (batch 32 x 65) at 1 and 2 threads, with OpenMP waiting
passively (our policy) and actively (OpenMP's default), alone and as two processes at once:
what a second thread gains a small model, and what each wait policy costs when cores are shared.

    python benchmarks/bench_threads.py                 # demo at its defaults (about 10 min)
    python benchmarks/bench_threads.py --commands demo topics
    python benchmarks/bench_threads.py --tiny          # demo --quick (what the tests run)

Run it on an otherwise idle machine: the load average at the start is recorded with the result.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, load_section, machine, print_table, update_section  # noqa: E402

COMMANDS = {
    "demo": ["demo"],
    "topics": ["experiment", "topics"],
}
QUICK = {
    "demo": ["--quick", "--base-steps", "10", "--codebook-steps", "12", "--eval-sequences", "16"],
    "topics": ["--quick"],
}
"""What ``--tiny`` runs: the commands' own smoke modes, cut further (seconds each)."""


def command_line(name: str, out: Path, tiny: bool, extra: list[str]) -> list[str]:
    args = [*COMMANDS[name], "--out", str(out), *(QUICK[name] if tiny else []), *extra]
    return [sys.executable, "-m", "codebook_lens.cli", *args]


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen[bytes], float, Any]:
    handle = log.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return (
        subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env),
        time.perf_counter(),
        handle,
    )


def finish(run: tuple[subprocess.Popen[bytes], float, Any], log: Path) -> dict[str, Any]:
    proc, t0, handle = run
    code = proc.wait()
    wall = time.perf_counter() - t0
    handle.close()
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} exited {code}:\n{text[-2000:]}")
    threads = re.findall(r"^threads: (\d+)", text, flags=re.M)
    return {"wall_s": round(wall, 2), "threads_at_start": int(threads[0]) if threads else None}


def measure(name: str, root: Path, tiny: bool, extra: list[str]) -> dict[str, Any]:
    """One run alone, then two together; walls and the slowdown of the worse concurrent run."""
    alone_log = root / f"{name}-alone.log"
    alone = finish(
        start(command_line(name, root / f"{name}-alone", tiny, extra), alone_log), alone_log
    )
    logs = [root / f"{name}-pair{i}.log" for i in range(2)]
    runs = [
        start(command_line(name, root / f"{name}-pair{i}", tiny, extra), logs[i]) for i in range(2)
    ]
    pair = [finish(run, log) for run, log in zip(runs, logs, strict=True)]
    worst = max(p["wall_s"] for p in pair)
    return {
        "alone": alone,
        "pair": pair,
        "two_runs_slowdown": round(worst / alone["wall_s"], 3),
    }


STEP_CODE = """
import sys, time, torch
from codebook_lens.experiments.fsm import DemoConfig
from codebook_lens.experiments.fsm.data import TokFSM
from codebook_lens.experiments.fsm.stages import build_base_model
torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])
cfg = DemoConfig()
fsm = TokFSM(cfg.fsm_config())
model = build_base_model(cfg, fsm).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, fsm.vocab_size, (cfg.batch_size, cfg.seq_len))
def step():
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(max(2, steps // 10)):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(steps / (time.perf_counter() - t))
"""


def step_rates(steps: int) -> dict[str, Any]:
    """Steps/s of the demo's base model: {policy: {threads: {alone, pair: [a, b]}}}."""
    out: dict[str, Any] = {}
    for policy in ("PASSIVE", "ACTIVE"):
        # The policy must be in the environment before torch loads OpenMP: one process each.
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
        }
        env["OMP_WAIT_POLICY"] = policy
        for n in (1, 2):
            cmd = [sys.executable, "-c", STEP_CODE, str(n), str(steps)]
            alone = float(
                subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            )
            procs = [
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
            ]
            pair = [float(p.communicate()[0]) for p in procs]
            out.setdefault(policy.lower(), {})[str(n)] = {
                "alone": round(alone, 2),
                "pair": [round(r, 2) for r in pair],
            }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(ap)
    ap.add_argument(
        "--commands", nargs="*", choices=sorted(COMMANDS), default=["demo"],
        help="commands to run alone and in pairs (none: only --step-rates)",
    )  # fmt: skip
    ap.add_argument("--contrast", action="store_true", help="also the pair with --threads 2 forced")
    ap.add_argument("--step-rates", action="store_true", help="also time one training step")
    args = ap.parse_args(argv)
    info = machine()
    results: dict[str, Any] = {"machine": info, "tiny": bool(args.tiny)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for name in args.commands:
            got = measure(name, Path(tmp), args.tiny, [])
            results[name] = {**got, "machine": info}  # commands may be measured on other days
            rows.append([name, "default", f"{got['alone']['wall_s']:.1f}",
                         " / ".join(f"{p['wall_s']:.1f}" for p in got["pair"]),
                         f"{got['two_runs_slowdown']:.2f}"])  # fmt: skip
            if args.contrast:
                forced = measure(name, Path(tmp), args.tiny, ["--threads", "2"])
                results[f"{name}_threads2"] = forced
                rows.append([name, "--threads 2", f"{forced['alone']['wall_s']:.1f}",
                             " / ".join(f"{p['wall_s']:.1f}" for p in forced["pair"]),
                             f"{forced['two_runs_slowdown']:.2f}"])  # fmt: skip
    if args.commands:
        # The headline is the worst command measured so far, this run's and earlier runs' alike.
        earlier = load_section(args.results, "threads")
        measured = [results[n]["two_runs_slowdown"] for n in args.commands] + [
            earlier[n]["two_runs_slowdown"]
            for n in COMMANDS
            if n not in args.commands
            and isinstance(earlier.get(n), dict)
            and "two_runs_slowdown" in earlier[n]
            and not args.tiny
            and not earlier.get("tiny")
        ]
        results["two_runs_slowdown"] = max(measured)
    if args.step_rates:
        rates = step_rates(20 if args.tiny else 200)
        results["step_rates"] = rates
        results["second_thread_gain"] = round(
            rates["passive"]["2"]["alone"] / rates["passive"]["1"]["alone"], 3
        )
        print_table(
            ["wait policy", "threads", "alone (steps/s)", "two processes at once (steps/s each)"],
            [[p, n, f"{r['alone']:.1f}", " / ".join(f"{x:.1f}" for x in r["pair"])]
             for p, by_n in rates.items() for n, r in by_n.items()],
            title="The demo's base-model training step (batch 32 x 65)",
        )  # fmt: skip
    if rows:
        print_table(
            ["command", "threads", "alone (s)", "two together (s)", "slowdown"],
            rows,
            title=f"Two runs at once vs one alone ({info['cpu']}, {info['cores']} cores, "
            f"load {info['load_avg_1m']} at start; target <= 2.5)",
        )
    update_section(args.results, "threads", results)
    return results


if __name__ == "__main__":
    main()
