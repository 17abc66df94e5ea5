"""A real ``codebook-lens serve`` process on a free loopback port, for tests that need one."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(proc: subprocess.Popen[bytes], url: str, seconds: float) -> bool:
    """Poll ``url`` until it answers 200 (True), or ``proc`` exits or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.3)


@contextlib.contextmanager
def serving(
    cache_dir: Path,
    model_dir: Path | None,
    log: Path,
    *,
    extra: Sequence[str] = (),
    threads: int = 2,
) -> Iterator[str]:
    """``serve CACHE [--model DIR] [extra...]`` until the block ends; yields its base URL.

    Waits (up to 120 s) for ``/api/overview`` to answer; the server is stopped in ``finally``.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "codebook_lens.cli", "serve", str(cache_dir), "--port", str(port)]
    cmd += ["--model", str(model_dir)] if model_dir is not None else []
    cmd += list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(proc, base + "/api/overview", 120):
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
