"""Load check for the web app: concurrent searches against a 1M-token cache over loopback.

Builds a synthetic cache (default 1M tokens, 8 codebooks, k=8, 1024 codes; code 7 of the first
codebook planted on "May"), starts ``codebook-lens serve`` on a free 127.0.0.1 port in a
subprocess, then fires ``--clients`` different searches (regexes, tokens, topics) at once
(one thread each, released together) at ``/api/search``. Every answer is compared with the
library called directly in this process (same ranking, precision, recall, counts); the planted
code must come first for ``\\bMay\\b``. Prints latency percentiles (p50 / p95 / max), wall time and
throughput, plus the first (cold) request and one-at-a-time latencies for reference.

Target (issue 7): all answers correct; p95 reported.

    python benchmarks/bench_app.py            # 1M tokens, 50 concurrent searches
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

from codebook_lens.cache import CodeCache, synthetic_cache
from codebook_lens.search import make_pattern, search

PER_PAGE = 10


def queries(cache: CodeCache, n: int) -> list[tuple[str, str]]:
    """``n`` different searches: topics, then word regexes, alternations and tokens."""
    words = sorted({s.strip() for s in cache.vocab if s.strip().isalpha()})
    labels = sorted({str(d.label) for d in cache.docs if d.label is not None})
    out: list[tuple[str, str]] = [("regex", r"\bMay\b")]
    out += [("topic", lab) for lab in labels]
    i = 0
    while len(out) < n:
        w = words[i % len(words)]
        if i % 3 == 0:
            out.append(("regex", rf"\b{w}\b"))
        elif i % 3 == 1:
            out.append(("token", w))
        else:
            out.append(("regex", rf"\b({w}|{words[(i * 7 + 3) % len(words)]})\w*"))
        i += 1
    return out[:n]


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
    url = (
        base + "/api/search?" + urllib.parse.urlencode({"q": q, "kind": kind, "per_page": PER_PAGE})
    )
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


def start_server(cache_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(base + "/static/style.css", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start:\n{log.read_text()}") from None
            time.sleep(0.3)


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--codebooks", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--num-codes", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=50, help="concurrent searches")
    ap.add_argument("--cache", type=Path, default=None, help="reuse / keep the cache here")
    ap.add_argument("--tiny", action="store_true", help="20k tokens, 10 clients: seconds")
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens, args.codebooks, args.num_codes, args.clients = 20_000, 3, 64, 10

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
        todo = queries(cache, args.clients)
        t0 = time.perf_counter()
        want = [expected(cache, kind, q) for kind, q in todo]
        print(
            f"expected answers from the library: {time.perf_counter() - t0:.1f} s "
            f"for {len(todo)} searches in this process"
        )

        proc, base = start_server(path, tmp / "server.log")
        cold, status, _ = get(base, "regex", r"\bthe\b")  # loads texts, spans, counts
        assert status == 200, status
        print(f"server on {base}: first search (cold) {cold:.3f} s")

        singles = [get(base, kind, q)[0] for kind, q in todo[:5]]
        print(f"one at a time (5 searches): mean {np.mean(singles):.3f} s")

        barrier = threading.Barrier(len(todo))
        results: list[tuple[float, int, dict[str, Any]] | None] = [None] * len(todo)

        def client(i: int) -> None:
            barrier.wait()
            results[i] = get(base, *todo[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(todo))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

        wrong = []
        for (kind, q), res, w in zip(todo, results, want, strict=True):
            assert res is not None
            _, status, data = res
            if status != 200 or answer(data) != w:
                wrong.append(f"{kind} {q!r}: status {status}")
        first = answer(results[0][2]) if results[0] else {}  # \bMay\b
        planted = first.get(next(iter(cache.codebooks)), [None])[0]
        if planted is None or planted[0] != 7 or planted[2:4] != (1.0, 1.0):
            wrong.append(f"planted code not first with precision = recall = 1: {planted}")
        lat = [r[0] for r in results if r is not None]
        print(
            f"\n{len(todo)} concurrent searches ({sum(k == 'regex' for k, _ in todo)} regex, "
            f"{sum(k == 'token' for k, _ in todo)} token, {sum(k == 'topic' for k, _ in todo)} "
            f"topic), {PER_PAGE} codes per codebook each:"
        )
        print(
            f"  latency p50 {percentile(lat, 50):.3f} s   p95 {percentile(lat, 95):.3f} s   "
            f"max {max(lat):.3f} s"
        )
        print(f"  wall {wall:.2f} s   throughput {len(todo) / wall:.1f} searches/s")
        print(
            f"  correct: {len(todo) - len(wrong)}/{len(todo)} (same ranking, precision, "
            "recall and counts as the library)"
        )
        for w in wrong:
            print(f"  WRONG {w}")
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
