"""Worker processes for CPU-bound queries (regex matching and ``bincount`` hold the GIL).

One pool type serves the library and the web app: ``search`` splits a large query over
``shared_pool`` (kept for the life of the process, so repeated queries start nothing), and the
app runs its searches in a ``WorkerPool`` of its own (a set-up per worker, lower priority).
Results are whatever the jobs return; jobs are module-level functions of plain arguments.

Workers

- start clean: from the forkserver where there is one, else spawned; never forked from a
  process with threads (a web server, torch's thread pools) and their locks;
- never import or re-run the caller's ``__main__``: multiprocessing rebuilds it in every child
  from ``__main__.__file__`` / ``__spec__``, which are set aside while a worker is launched
  (the only switch it has; a script without an ``if __name__ == "__main__"`` guard, or code
  read from stdin, would otherwise run again or fail in each worker);
- import no torch or transformers (seconds and ~100 MB each): the package root loads its
  public names lazily, and a worker imports only this module and its jobs' modules;
- die with their parent however it ends (exit, exception, a signal, SIGKILL): a watchdog thread
  waits on the parent's sentinel, which the kernel closes when the parent dies, and on Linux
  the kernel also kills a worker whose forking process dies (``PR_SET_PDEATHSIG``);
- are waited for by ``close``, so the pool's queues (five named semaphores) are released
  before the process exits; otherwise the resource tracker reports them as leaked.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any, TypeVar

from codebook_lens.threads import available_cores

R = TypeVar("R")

WATCH_SECONDS = 1.0
"""How often a worker's watchdog also checks that its parent's pid is still there."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LAUNCH = threading.Lock()  # one launch at a time sets __main__'s file and spec aside
_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def choose_workers(workers: int | None, work: float, threshold: float, units: int) -> int:
    """Processes for a job of ``work`` split into at most ``units`` pieces.

    ``workers`` given: that many (at most ``units``). ``None``: one per core once ``work``
    reaches ``threshold``, else 1; always 1 inside a worker process (pools do not nest well).
    """
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} is invalid; it must be an integer >= 1 or None")
        return max(1, min(workers, units))
    if work < threshold or multiprocessing.parent_process() is not None:
        return 1
    return max(1, min(available_cores(), units))


@contextlib.contextmanager
def _main_set_aside() -> Iterator[None]:
    """``__main__`` without ``__file__`` and ``__spec__`` while workers are launched, so that
    multiprocessing gives them nothing of it to import (as for an interactive session)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _LAUNCH:
        saved = {k: main.__dict__.pop(k) for k in ("__file__",) if k in main.__dict__}
        spec = getattr(main, "__spec__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.update(saved)
            main.__spec__ = spec


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class WorkerPool:
    """Up to ``workers`` processes, started on first use and restarted after ``close``.

    ``setup`` (``"module:function"``, imported in the worker after the boot) runs once in each
    worker with ``setup_args`` (plain values); ``niceness`` lowers the workers' CPU priority.
    """

    def __init__(
        self,
        workers: int,
        *,
        setup: str | None = None,
        setup_args: tuple[Any, ...] = (),
        niceness: int = 0,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} is invalid; it must be an integer >= 1")
        self.workers = workers
        self._settings = (niceness, setup, setup_args)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.broken = False
        """Whether a worker died unexpectedly (the pool refuses work until ``close``)."""
        _POOLS.add(self)

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=_context(),
                    initializer=start_worker,
                    initargs=self._settings,
                )
            return self._executor

    def submit(self, fn: Callable[..., R], /, *args: Any) -> Future[R]:
        """Run ``fn(*args)`` in a worker; ``fn`` must be a module-level function."""
        executor = self._started()
        try:
            with _main_set_aside():  # submit() launches the workers it still needs
                return executor.submit(fn, *args)
        except BrokenProcessPool:
            self.broken = True
            raise

    def map(self, fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]]) -> list[R]:
        """``[fn(*job) for job in jobs]`` over the workers, in order; the first error raises
        (and cancels the jobs not yet started)."""
        futures = [self.submit(fn, *job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:
            self.broken = True
            raise
        finally:
            for f in futures:
                f.cancel()

    def start(self) -> None:
        """Launch every worker and wait until each has run its set-up."""
        for f in [self.submit(_ready) for _ in range(self.workers)]:
            f.result()

    def close(self) -> None:
        """Stop the workers and wait for them (jobs not yet started are cancelled)."""
        with self._lock:
            executor, self._executor = self._executor, None
            self.broken = False
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def shared_pool(workers: int) -> WorkerPool:
    """The library's pool with at least ``workers`` processes (replaced by a larger one, or
    after a worker died)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.workers < workers or _SHARED.broken:
            old, _SHARED = _SHARED, WorkerPool(workers)
            if old is not None:
                old.close()
        return _SHARED


def run_jobs(fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]], workers: int) -> list[R]:
    """``[fn(*job) for job in jobs]``: here if ``workers <= 1`` or one job, else split over
    ``shared_pool(workers)``; the same results either way."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    return shared_pool(workers).map(fn, jobs)


def close_all() -> None:
    """Close every pool of this process (what happens at exit; for tests and notebooks)."""
    for pool in list(_POOLS):
        pool.close()


# ------------------------------------------------------------- worker side
def _ready() -> int:
    return os.getpid()


def start_worker(niceness: int, setup: str | None, setup_args: tuple[Any, ...]) -> None:
    """Run first in each worker: tie it to its parent, then its set-up."""
    die_with_parent()
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)
    if setup is not None:
        module, _, name = setup.partition(":")
        getattr(importlib.import_module(module), name)(*setup_args)


def die_with_parent() -> None:
    """End this (child) process as soon as its parent process is gone, however it ended."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    forker = os.getppid()  # the parent itself, or the forkserver that forked this process
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    watchdog = threading.Thread(
        target=_watch, args=(parent.sentinel, parent.pid, forker), name="parent-watchdog"
    )
    watchdog.daemon = True
    watchdog.start()


def _watch(sentinel: int, parent_pid: int, forker: int) -> None:
    """Exit at once when the parent's sentinel closes, its pid is gone or this process has
    been handed to another parent."""
    while not wait([sentinel], timeout=WATCH_SECONDS):
        if os.getppid() != forker or not _pid_alive(parent_pid):
            break
    os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
