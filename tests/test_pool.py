"""Worker pools: clean workers (no torch, no caller's ``__main__``), the same answers as the
serial path, and no worker outliving its parent, however the parent ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.serving import wait_until_up
from helpers.synthetic import synthetic_cache
from processes import alive, children, cmdline, descendants, has_proc, wait_gone

from codebook_lens.codes.pool import WorkerPool, choose_workers, run_jobs

ROOT = Path(__file__).resolve().parents[1]
needs_proc = pytest.mark.skipif(not has_proc(), reason="reads the process tree from /proc")


def loaded(names: list[str]) -> tuple[dict[str, bool], str | None]:
    """Run in a worker: which of ``names`` it has imported, and its ``__main__``'s file."""
    return {n: n in sys.modules for n in names}, getattr(sys.modules["__main__"], "__file__", None)


def square(x: int) -> int:
    return x * x


def test_workers_import_neither_torch_nor_the_callers_main() -> None:
    pool = WorkerPool(1)
    try:
        names = ["torch", "transformers", "codebook_lens.model", "conftest"]
        got, main_file = pool.submit(loaded, names).result(timeout=120)
    finally:
        pool.close()
    assert got == {n: False for n in names}, got
    assert main_file is None  # pytest's entry point was not run again


def test_results_equal_the_serial_path_and_close_waits_for_the_workers() -> None:
    pool = WorkerPool(2)
    jobs = [(i,) for i in range(20)]
    assert pool.map(square, jobs) == [square(*j) for j in jobs]
    assert run_jobs(square, jobs, 2) == run_jobs(square, jobs, 1)
    pids = {pool.submit(os.getpid).result() for _ in range(8)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    pool.close()
    assert not wait_gone(sorted(pids), timeout=5)  # close() waited for them
    assert pool.map(square, [(3,), (4,)]) == [9, 16]  # restarts after close
    pool.close()


def test_choose_workers() -> None:
    assert choose_workers(3, 0, 1, 10) == 3 and choose_workers(3, 0, 1, 2) == 2
    assert choose_workers(None, 0, 1, 10) == 1  # too little work to gain from processes
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        choose_workers(0, 0, 1, 10)
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        WorkerPool(0)


# ----------------------------------------------------------- parent death
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


def start_server(cache_dir: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "codebook_lens.cli", "serve", str(cache_dir), "--host",
           "127.0.0.1", "--port", str(port), "--search-workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    if not wait_until_up(proc, base + "/static/style.css", 240):
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"server did not start:\n{err.decode()[-2000:]}")
    return proc, base


def tree(pid: int) -> list[int]:
    return [p for p in descendants(pid) if alive(p)]


def workers_of(pid: int) -> list[int]:
    """Pool workers of ``pid``: spawned children, or children of its forkserver."""
    out = []
    for child in children(pid):
        if "multiprocessing.forkserver" in cmdline(child):
            out += [c for c in children(child) if alive(c)]
        elif "spawn_main" in cmdline(child) and alive(child):
            out.append(child)
    return out


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "cache"
    synthetic_cache(path, n_tokens=4000, n_codebooks=2, num_codes=32, k=2, plant={"May": 7})
    return path


@needs_proc
def test_sigkilled_server_takes_its_workers_along(small_cache: Path) -> None:
    proc, base = start_server(small_cache, workers=2)
    try:
        with urllib.request.urlopen(base + "/api/search?q=May&kind=regex", timeout=60) as r:
            assert r.status == 200
        family = tree(proc.pid)
        assert len(workers_of(proc.pid)) == 2, [cmdline(p) for p in family]
        proc.kill()
        proc.wait(timeout=30)
        left = wait_gone(family, timeout=10)
        assert not left, [cmdline(p) for p in left]  # workers, forkserver, resource tracker
    finally:
        proc.kill()
        proc.communicate()


@needs_proc
@pytest.mark.slow  # a second server start-up: ~10-20 s on 2 busy cores
def test_sigterm_closes_the_server_cleanly(small_cache: Path) -> None:
    proc, _ = start_server(small_cache, workers=2)
    try:
        family = tree(proc.pid)
        assert len(workers_of(proc.pid)) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not wait_gone(family, timeout=10)
        _, err = proc.communicate(timeout=30)
        assert b"leaked" not in err and b"Traceback" not in err, err.decode()[-2000:]
    finally:
        proc.kill()
        proc.communicate()


@needs_proc
@pytest.mark.slow  # a CLI start-up and a backtracking regex: ~10-20 s on 2 busy cores
def test_sigkilled_search_takes_its_workers_along(small_cache: Path) -> None:
    # Nested quantifiers and a character no text has: each worker backtracks until killed.
    cmd = [sys.executable, "-m", "codebook_lens.cli", "search", str(small_cache),
           "--regex", r"(?:\w*\s?)*#", "--timeout", "300", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(workers_of(proc.pid)) < 2:
            assert proc.poll() is None, "the search ended before its workers were seen"
            assert time.monotonic() < deadline, "no search workers started"
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are matching now
        family = tree(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        left = wait_gone(family, timeout=10)
        assert not left, [cmdline(p) for p in left]
    finally:
        proc.kill()
        proc.wait()
