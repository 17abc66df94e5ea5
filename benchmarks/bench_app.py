"""Load check for the web app: concurrent searches against a 1M-token cache over loopback.

Builds a synthetic cache (default 1M tokens, 8 codebooks, k=8, 1024 codes; code 7 of the first
codebook planted on "May"), starts ``codebook-lens serve`` on a free 127.0.0.1 port in a
subprocess (searches in one worker process per core), then, side by side in each round:

1. runs ``--clients`` different searches (regexes, tokens, topics; a fresh set each round)
   one at a time: their mean is "one search's time" t1, and the hardware limit for a burst
   of N is N x t1 / cores;
2. fires the same N searches at once (one thread each, released together; respelled, so the
   server cannot reuse the patterns it memoised in step 1) while a client in another
   process asks for the overview page every 0.1 s.

A warm-up pass of the same kind comes first and is not scored. Every answer is compared with
the library called directly in this process (same ranking, precision, recall, counts); the
planted code must come first for ``\\bMay\\b``. Prints latency percentiles, p95 / limit, the
overview's worst latency under load, the server's CPU time per search and cores busy in each
phase (on a shared machine they tell contention from overhead), and the load average.

Targets (issue 19): all answers correct; p95 <= 1.5 x (N x t1 / cores); overview < 0.5 s.

    python benchmarks/bench_app.py            # 1M tokens, 50 concurrent searches, 3 rounds
    python benchmarks/bench_app.py --tiny     # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The synthetic cache is a test fixture: tests/helpers/synthetic.py.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, machine, save_section  # noqa: E402
from helpers.serving import wait_until_up  # noqa: E402
from helpers.synthetic import synthetic_cache  # noqa: E402

from codebook_lens.codes.cache import CodeCache
from codebook_lens.codes.search import make_pattern, search

PER_PAGE = 10


def queries(cache: CodeCache, n: int, variant: int = 0) -> list[tuple[str, str]]:
    """``n`` different searches: the planted regex, topics, word regexes, alternations, tokens.

    Each ``variant`` is a fresh set of the same mix (other words; the planted regex spelled
    differently), so no search of one pass reuses a pattern the server memoised in another.
    """
    words = sorted({s.strip() for s in cache.vocab if s.strip().isalpha()})
    labels = sorted({str(d.label) for d in cache.docs if d.label is not None})
    out: list[tuple[str, str]] = [("regex", r"\bMay\b" + "(?:)" * variant)]
    out += [("topic", lab) for lab in labels]
    i, start = 0, variant * n
    while len(out) < n:
        w = words[(start + i) % len(words)]
        if i % 3 == 0:
            out.append(("regex", rf"\b{w}\b"))
        elif i % 3 == 1:
            out.append(("token", w))
        else:
            other = words[(start + i * 7 + 3) % len(words)]
            out.append(("regex", rf"\b({w}|{other})\w*"))
        i += 1
    return out[:n]


def respelled(kind: str, q: str) -> str:
    """The same search spelled differently (same tokens selected, same answer), so the server
    computes its pattern afresh instead of reusing the one it memoised for ``q``."""
    return q + "(?:)" if kind == "regex" else " " + q if kind == "token" else q


def expected(cache: CodeCache, kind: str, q: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the app must answer, from the library: the top PER_PAGE codes of every codebook."""
    kw = {"regex": q} if kind == "regex" else {"token": q} if kind == "token" else {"docs_label": q}
    pattern = make_pattern(cache, timeout=60, **kw)  # type: ignore[arg-type]
    out = {}
    for name in cache.codebooks:
        res = search(cache, pattern, codebooks=[name], top=PER_PAGE)
        out[name] = [(m.code, m.head, m.precision, m.recall, m.count, m.hits) for m in res.matches]
    return out


def answer(data: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        sec["codebook"]: [
            (m["code"], m["head"], m["precision"], m["recall"], m["count"], m["hits"])
            for m in sec["matches"]
        ]
        for sec in data["results"]
    }


def get(base: str, kind: str, q: str) -> tuple[float, int, dict[str, Any]]:
    params = urllib.parse.urlencode({"q": q, "kind": kind, "per_page": PER_PAGE})
    return fetch(base + "/api/search?" + params)


def fetch(url: str) -> tuple[float, int, dict[str, Any]]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=600) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return time.perf_counter() - t0, status, json.loads(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    cache_dir: Path, log: Path, workers: int | None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "codebook_lens.cli",
        "serve",
        str(cache_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--regex-timeout",
        "30",
        *([] if workers is None else ["--search-workers", str(workers)]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    if not wait_until_up(proc, base + "/static/style.css", 180):
        proc.kill()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")
    return proc, base


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (Linux ``/proc``; else 0)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, IndexError):
        return 0.0
    return total


WATCHER = """
import sys, time, urllib.request
url = sys.argv[1]
print("ready", flush=True)
while True:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        r.read()
        assert r.status == 200, r.status
    print(time.perf_counter() - t0, flush=True)
    time.sleep(0.1)
"""
"""A client of its own (a separate process, so the 50 search threads' GIL does not delay it)
asking for the overview every 0.1 s and printing each latency."""


def burst(
    base: str, todo: list[tuple[str, str]]
) -> tuple[list[tuple[float, int, dict[str, Any]] | None], float, list[float]]:
    """All searches at once, plus an overview request every 0.1 s until they are done."""
    barrier = threading.Barrier(len(todo))
    results: list[tuple[float, int, dict[str, Any]] | None] = [None] * len(todo)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = get(base, *todo[i])

    watch = subprocess.Popen(
        [sys.executable, "-c", WATCHER, base + "/api/overview"], stdout=subprocess.PIPE, text=True
    )
    assert watch.stdout is not None
    assert watch.stdout.readline().strip() == "ready"
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(todo))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    watch.terminate()
    out, _ = watch.communicate(timeout=30)
    overview = [float(line) for line in out.split()]
    return results, wall, overview


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--codebooks", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--num-codes", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=50, help="concurrent searches")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (one at a time, burst)")
    ap.add_argument("--workers", type=int, default=None, help="--search-workers of the server")
    ap.add_argument("--cache", type=Path, default=None, help="reuse / keep the cache here")
    ap.add_argument("--tiny", action="store_true", help="20k tokens, 10 clients: seconds")
    ap.add_argument(
        "--results",
        default=None,
        help=f"JSON file to merge the 'app' section into (default {RESULTS}; not with --tiny)",
    )
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens, args.codebooks, args.num_codes, args.clients = 20_000, 3, 64, 10
        args.rounds = 1
    results_path = args.results if args.results is not None else ("" if args.tiny else RESULTS)

    tmp = Path(tempfile.mkdtemp(prefix="bench_app_"))
    path = args.cache or tmp / "cache"
    proc = None
    try:
        t0 = time.perf_counter()
        if (path / "manifest.json").is_file():
            cache, built = CodeCache(path), "reused"
        else:
            cache = synthetic_cache(
                path,
                n_tokens=args.tokens,
                n_codebooks=args.codebooks,
                num_codes=args.num_codes,
                k=args.k,
                plant={"May": 7},
                progress=not args.tiny,
            )
            built = f"built in {time.perf_counter() - t0:.1f} s"
        cb0 = next(iter(cache.codebooks.values()))
        print(
            f"cache: {cache.n_tokens:,} tokens, {cache.n_docs:,} documents, "
            f"{len(cache.codebooks)} codebooks x k={cb0.k}, C={cb0.num_codes}; {built}"
        )
        # A fresh set per round, run one at a time and then all at once, respelled.
        sets = [queries(cache, args.clients, v) for v in range(args.rounds)]
        t0 = time.perf_counter()
        wants = [[expected(cache, kind, q) for kind, q in todo] for todo in sets]
        print(
            f"expected answers from the library: {time.perf_counter() - t0:.1f} s "
            f"for {len(sets)} x {args.clients} searches in this process"
        )
        todo = sets[0]

        proc, base = start_server(path, tmp / "server.log", args.workers)
        cores = len(os.sched_getaffinity(proc.pid)) if hasattr(os, "sched_getaffinity") else 1
        workers = cores if args.workers is None else args.workers
        cold, status, _ = get(base, "token", " the ")  # a pattern no set uses
        assert status == 200, status
        print(
            f"server on {base}: {workers} search worker(s), {cores} core(s); first search {cold:.3f} s"
        )

        # Warm-up, not scored: each worker maps the code arrays' pages on first touch, and
        # the first burst starts the server's threads; neither belongs to a search's time.
        warm = queries(cache, args.clients, args.rounds)
        for kind, q in warm:
            get(base, kind, q)
        burst(base, [(kind, respelled(kind, q)) for kind, q in warm])

        wrong: list[str] = []
        rounds = []
        load_before = os.getloadavg()[0]
        cpu0, wall0 = cpu_seconds(proc.pid), time.perf_counter()
        for r in range(args.rounds):
            singles = []
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            for (kind, q), w in zip(sets[r], wants[r], strict=True):
                t, status, data = get(base, kind, q)
                singles.append(t)
                if status != 200 or answer(data) != w:
                    wrong.append(f"one at a time: {kind} {q!r}: status {status}")
            c1, t1_wall = cpu_seconds(proc.pid), time.perf_counter()
            todo = [(kind, respelled(kind, q)) for kind, q in sets[r]]
            res, wall, overview = burst(base, todo)
            c2 = cpu_seconds(proc.pid)
            # The machine is shared: how many cores the server got in each phase, and its CPU
            # per search (the same in both phases if concurrency costs nothing extra).
            busy_one, busy_many = (c1 - c0) / (t1_wall - t0), (c2 - c1) / wall
            for (kind, q), got, w in zip(todo, res, wants[r], strict=True):
                assert got is not None
                if got[1] != 200 or answer(got[2]) != w:
                    wrong.append(f"concurrent: {kind} {q!r}: status {got[1]}")
            first = answer(res[0][2]) if res[0] else {}  # \bMay\b
            planted = first.get(next(iter(cache.codebooks)), [None])[0]
            if planted is None or planted[0] != 7 or planted[2:4] != (1.0, 1.0):
                wrong.append(f"planted code not first with precision = recall = 1: {planted}")
            lat = [x[0] for x in res if x is not None]
            t1 = float(np.mean(singles))
            limit = len(todo) * t1 / cores
            rounds.append(
                {
                    "one_search_s": t1,
                    "limit_s": limit,
                    "p50_s": percentile(lat, 50),
                    "p95_s": percentile(lat, 95),
                    "max_s": max(lat),
                    "wall_s": wall,
                    "p95_vs_limit": percentile(lat, 95) / limit,
                    "overview_max_s": max(overview) if overview else float("nan"),
                    "overview_requests": len(overview),
                    "cores_busy_one_at_a_time": busy_one,
                    "cores_busy_concurrent": busy_many,
                    "cpu_per_search_one_at_a_time_s": (c1 - c0) / len(todo),
                    "cpu_per_search_concurrent_s": (c2 - c1) / len(todo),
                    # On a machine of our own a search alone keeps one core busy and a burst
                    # keeps every core busy, so there p95 / limit would be what is left:
                    # (p95 / burst wall) x (CPU per search concurrent / alone).
                    "projected_p95_vs_limit_idle": percentile(lat, 95)
                    / wall
                    * (c2 - c1)
                    / (c1 - c0),
                }
            )
            x = rounds[-1]
            print(
                f"\nround {r + 1}: one at a time: mean {t1:.3f} s -> limit {len(todo)} x "
                f"{t1:.3f} / {cores} = {limit:.2f} s\n"
                f"  {len(todo)} concurrent: p50 {x['p50_s']:.3f} s   p95 {x['p95_s']:.3f} s   "
                f"max {x['max_s']:.3f} s   wall {wall:.2f} s   p95 / limit = "
                f"{x['p95_vs_limit']:.2f}\n"
                f"  overview during the burst: {len(overview)} requests, worst "
                f"{x['overview_max_s']:.3f} s\n"
                f"  server CPU per search {x['cpu_per_search_one_at_a_time_s']:.3f} s alone, "
                f"{x['cpu_per_search_concurrent_s']:.3f} s concurrent; cores busy "
                f"{busy_one:.2f} alone, {busy_many:.2f} concurrent (of {cores})"
            )
        cpu = cpu_seconds(proc.pid) - cpu0
        span = time.perf_counter() - wall0
        load_after = os.getloadavg()[0]
        ratio = float(np.median([x["p95_vs_limit"] for x in rounds]))
        projected = float(np.median([x["projected_p95_vs_limit_idle"] for x in rounds]))
        over = max(x["overview_max_s"] for x in rounds)
        n_regex = sum(k == "regex" for k, _ in todo)
        print(
            f"\n{len(todo)} searches ({n_regex} regex, {sum(k == 'token' for k, _ in todo)} token, "
            f"{sum(k == 'topic' for k, _ in todo)} topic), {PER_PAGE} codes per codebook each, "
            f"{args.rounds} round(s)"
        )
        print(
            f"  p95 / limit (median of rounds) {ratio:.2f}  (target <= 1.5)   overview worst "
            f"{over:.3f} s (target < 0.5)\n"
            f"  projected p95 / limit on an idle machine (from CPU per search) {projected:.2f}"
        )
        print(
            f"  server CPU {cpu:.1f} s over {span:.1f} s wall ({cpu / max(span, 1e-9):.2f} cores "
            f"busy); load average {load_before:.2f} -> {load_after:.2f}"
        )
        checks = len(todo) * 2 * args.rounds
        print(
            f"  correct: {checks - len(wrong)}/{checks} (same ranking, precision, recall and "
            "counts as the library)"
        )
        for w in wrong:
            print(f"  WRONG {w}")
        save_section(
            results_path,
            "app",
            {
                "machine": machine(),
                "settings": {
                    "tokens": cache.n_tokens,
                    "codebooks": len(cache.codebooks),
                    "k": cb0.k,
                    "num_codes": cb0.num_codes,
                    "clients": len(todo),
                    "workers": workers,
                    "cores": cores,
                },
                "rounds": rounds,
                "p95_vs_limit": ratio,
                "projected_p95_vs_limit_idle": projected,
                "overview_max_s": over,
                "server_cpu_s": cpu,
                "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
                "correct": not wrong,
            },
        )
        return 1 if wrong else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.cache is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
