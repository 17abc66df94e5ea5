"""Shared benchmark plumbing: interleaved timing, peak memory, tables, results.json.

Every benchmark script accepts ``--tiny`` (seconds; what tests/test_benchmarks.py runs) and
``--results PATH`` (default ``benchmarks/results.json``; ``--results ''`` writes nothing) and
stores its numbers under its own top-level section with ``save_section``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results.json"


# ------------------------------------------------------------------------------ timing
def sync(device: torch.device | str = "cpu") -> None:
    """Wait for queued GPU work (a no-op on CPU) so that wall time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median wall seconds per function, measured round-robin in one run.

    Interleaving (A B C A B C ...) spreads load from other processes on a shared machine
    over every contender instead of penalising whichever ran during a busy spell.
    """
    return time_wall_cpu(fns, repeats, warmup=warmup, device=device)[0]


def time_wall_cpu(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[str, float]]:
    """Like ``time_interleaved``, also returning median process CPU seconds per function.

    CPU time (all threads of this process) barely moves when other processes compete for
    the cores, so on a loaded machine its ratios are the steadier cross-check; wall time is
    what a user waits for.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return (
        {name: statistics.median(ts) for name, ts in wall.items()},
        {name: statistics.median(ts) for name, ts in cpu.items()},
    )


def similarity_floor(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The bare similarity matmul of ``x`` ``(N, G * d)`` with every group's codes
    ``(G, C, d)``: the score matrix and nothing else, the cost any codebook layer must pay."""
    g, _, d = codebook.shape
    with torch.no_grad():
        xg = x.detach().reshape(-1, g, d).transpose(0, 1)
        return torch.bmm(xg, codebook.detach().transpose(1, 2))


# ------------------------------------------------------------------------------ memory
def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated by ``fn`` above what was live when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: torch's CPU allocator
    keeps no statistics, so run ``fn`` once under ``torch.profiler`` with
    ``profile_memory=True``; every allocation and free is then recorded with the running
    "Total Allocated" of tensors made while profiling, whose maximum is the peak. This counts
    tensor bytes only (not allocator slack, and not memory that non-torch code such as FAISS
    allocates), identically for every contender. Results of ``fn`` are dropped before
    returning, so the peak includes anything ``fn`` keeps alive while it runs.
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = [
        e["args"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    if not mem:
        return 0
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return int(max(m["Total Allocated"] for m in mem) - start)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Mute file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ------------------------------------------------------------------------------ output
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """Print (and return) a GitHub-markdown table with right-aligned number columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    )
    text = "\n".join([line(header), sep, *(line(r) for r in rows)])
    if title:
        text = f"\n{title}\n\n{text}"
    print(text, flush=True)
    return text


def machine() -> dict[str, Any]:
    """Where the numbers came from (one line in every section)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- results
def save_section(path: str | os.PathLike[str] | None, section: str, data: dict[str, Any]) -> None:
    """Merge ``{section: data}`` into the JSON file at ``path`` (atomically; ``None``/'' skips).

    Other sections already in the file are kept, so each benchmark owns only its own keys.
    """
    if not path:
        return
    path = Path(path)
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            current = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            current = {}
    current[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def update_section(path: str | os.PathLike[str] | None, section: str, data: dict[str, Any]) -> None:
    """Merge ``data``'s keys into an existing section (creating it if needed)."""
    if not path:
        return
    save_section(path, section, {**load_section(path, section), **data})


def load_section(path: str | os.PathLike[str] | None, section: str) -> dict[str, Any]:
    """One section of a results file as saved; empty if the file or the section is missing."""
    if not path or not Path(path).is_file():
        return {}
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8")).get(section)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def add_common_args(ap: Any) -> None:
    """The flags every benchmark script shares."""
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: seconds (used by the tests)")
    ap.add_argument("--full", action="store_true", help="the whole grid (slow on 2 cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per contender")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--results",
        default=str(RESULTS),
        help="JSON file to merge this benchmark's section into ('' = do not save)",
    )
