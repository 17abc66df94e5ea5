"""Two long commands started together on the same cores: how much slower is each than alone?

Runs a command (the FSM demo by default, `experiment topics` with ``--commands topics``) once
alone, then twice at the same time, each as its own ``codebook-lens`` process at its default
thread policy, and reports each concurrent run's wall time over the lone run's
(``threads.two_runs_slowdown``: the worse of the two; 2.0 is what sharing 2 cores costs a job
that used both, more means the runs hold each other up). ``--contrast`` adds the same pair with
``--threads 2`` forced in both, the configuration that used to collapse.

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
from common import add_common_args, machine, print_table, update_section  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(ap)
    ap.add_argument("--commands", nargs="+", choices=sorted(COMMANDS), default=["demo"])
    ap.add_argument("--contrast", action="store_true", help="also the pair with --threads 2 forced")
    args = ap.parse_args(argv)
    info = machine()
    results: dict[str, Any] = {"machine": info, "tiny": bool(args.tiny)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for name in args.commands:
            got = measure(name, Path(tmp), args.tiny, [])
            results[name] = got
            rows.append([name, "default", f"{got['alone']['wall_s']:.1f}",
                         " / ".join(f"{p['wall_s']:.1f}" for p in got["pair"]),
                         f"{got['two_runs_slowdown']:.2f}"])  # fmt: skip
            if args.contrast:
                forced = measure(name, Path(tmp), args.tiny, ["--threads", "2"])
                results[f"{name}_threads2"] = forced
                rows.append([name, "--threads 2", f"{forced['alone']['wall_s']:.1f}",
                             " / ".join(f"{p['wall_s']:.1f}" for p in forced["pair"]),
                             f"{forced['two_runs_slowdown']:.2f}"])  # fmt: skip
    results["two_runs_slowdown"] = max(results[n]["two_runs_slowdown"] for n in args.commands)
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
