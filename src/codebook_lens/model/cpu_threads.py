"""CPU threads for the codebook search: a shared pool of single-threaded helpers.

Each helper runs torch ops with one intra-op thread, so tiles scored side by side do not
fight over cores; the caller's thread count is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None
"""(pid, threads, pool) of the helper threads that score tiles; rebuilt after a fork."""


def _single_threaded_worker() -> None:
    # A fresh thread adopts torch's process-wide thread count on its first op; pin this one to
    # one intra-op thread for life (the caller restores the process-wide count afterwards).
    torch.get_num_threads()
    torch.set_num_threads(1)


def _helper_pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool of ``threads`` single-threaded helpers (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        pool = _POOL
        if pool is None or pool[0] != os.getpid() or pool[1] != threads:
            if pool is not None and pool[0] == os.getpid():
                pool[2].shutdown(wait=False)
            executor = ThreadPoolExecutor(
                threads, thread_name_prefix="codebook-score", initializer=_single_threaded_worker
            )
            pool = _POOL = (os.getpid(), threads, executor)
        return pool[2]


def run_parallel(tasks: list[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` CPU threads (the caller's among them), one intra-op thread
    each, taking tasks in order as threads free up. Each task writes its own output rows, so
    results do not depend on the schedule."""
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    lock = threading.Lock()
    todo = iter(tasks)
    failed: list[BaseException] = []

    def drain() -> None:
        with torch.no_grad():
            while not failed:
                with lock:
                    task = next(todo, None)
                if task is None:
                    return
                try:
                    task()
                except BaseException as e:  # stop the others; re-raised by the caller
                    failed.append(e)
                    raise

    pool = _helper_pool(threads - 1)
    helpers = [pool.submit(drain) for _ in range(min(threads, len(tasks)) - 1)]
    try:
        # The caller works too; leaving this block restores its (and the process-wide)
        # thread count, which a helper thread's first start resets to one.
        with one_cpu_thread(torch.device("cpu")):
            try:
                drain()
            finally:
                for f in helpers:
                    f.exception()  # wait for every helper before the count is restored
    finally:
        if failed:
            raise failed[0]


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op CPU thread (no-op off the CPU or when already 1)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
