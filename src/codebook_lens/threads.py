"""One CPU thread policy for every long command (train, pretrain, eval, cache, experiments, demo).

torch's intra-op threads meet at a barrier after every operation. When other processes share
the cores, a thread that lost its core holds up the others, and with OpenMP's default active
waiting the waiting threads burn the very cores the late one needs: two runs of the FSM demo
with two threads each on two cores trained about 20x slower than with one thread each. So:

- OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``), set before torch loads its
  OpenMP runtime (``codebook_lens.cli`` imports this module first);
- ``--threads N`` (N > 0) is used as given, and so is ``OMP_NUM_THREADS`` when set;
- otherwise (``--threads 0``, the default) the process uses the cores that no other process is
  using, measured from ``/proc/stat`` over a short window (our own CPU time subtracted), and
  measures again every ``recheck_seconds`` while the work runs (``tick()`` in the training and
  caching loops), so two runs started together on an idle machine settle on one thread each
  within seconds.

The automatic policy belongs to a process: the ``codebook-lens`` command applies it, while
``cli.main(argv)`` called from Python keeps the caller's torch threads unless ``--threads N``
is given. ``use`` scopes a policy to a block and restores the previous thread count after it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RECHECK_SECONDS = 10.0
"""How often ``tick()`` measures the machine again under the automatic policy."""

WINDOW_SECONDS = 0.25
"""How long one measurement of the other processes' CPU use lasts."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _machine_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuSample(NamedTuple):
    """Machine-wide busy CPU seconds, our own CPU seconds, and the time they were read."""

    machine: float | None
    own: float
    at: float


def sample_cpu() -> CpuSample:
    return CpuSample(_machine_busy_seconds(), time.process_time(), time.monotonic())


def other_load(since: CpuSample | None = None, window: float = WINDOW_SECONDS) -> float:
    """Cores' worth of CPU that other processes used since ``since`` (else over ``window`` s).

    Falls back to the 1-minute load average minus our own threads where ``/proc`` is absent.
    """
    start = since if since is not None else sample_cpu()
    if start.machine is None:
        try:
            return max(0.0, os.getloadavg()[0] - 1.0)
        except OSError:
            return 0.0
    if since is None:
        time.sleep(window)
    end = sample_cpu()
    assert end.machine is not None
    elapsed = max(end.at - start.at, 1e-6)
    return max(0.0, (end.machine - start.machine) - (end.own - start.own)) / elapsed


def auto_threads(cores: int | None = None, others: float | None = None) -> int:
    """Threads for the cores other processes leave free: at least 1, at most ``cores``."""
    cores = available_cores() if cores is None else cores
    others = other_load() if others is None else others
    # A core counts as taken once another process uses more than a third of it: a thread that
    # shares a core holds up the barrier of every operation.
    free = cores - int(others + 2 / 3)
    return max(1, min(cores, free))


@dataclass
class ThreadPolicy:
    """The torch thread count of this process, chosen once and (automatic) re-checked."""

    requested: int = 0
    """Threads asked for; 0 picks them from the free cores and re-checks as the load changes."""
    recheck_seconds: float = RECHECK_SECONDS
    threads: int = 0
    last: CpuSample | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.requested, bool) or not isinstance(self.requested, int):
            raise ValueError(f"threads={self.requested!r} is invalid; it must be an integer >= 0")
        if self.requested < 0:
            raise ValueError(f"threads={self.requested!r} is invalid; it must be an integer >= 0")

    def apply(self) -> int:
        """Choose the thread count now and give it to torch; returns it."""
        import torch

        # The first choice measures a short window; re-checks measure the whole interval since
        # the last one, so they cost nothing but two small reads.
        self.threads = self.requested or auto_threads(others=other_load(self.last))
        self.last = sample_cpu()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def tick(self) -> None:
        """Re-check under the automatic policy, at most every ``recheck_seconds``."""
        if self.requested or self.last is None:
            return
        if time.monotonic() - self.last.at < self.recheck_seconds:
            return
        self.apply()


_POLICY: ThreadPolicy | None = None


def env_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it to a positive integer, else 0."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 0


@contextlib.contextmanager
def use(requested: int, *, announce: bool = True) -> Iterator[int]:
    """Run the block under a thread policy; the previous policy and thread count come back.

    ``requested`` > 0 is used as given; 0 takes ``OMP_NUM_THREADS`` when the user set it, else
    the automatic policy. Yields the thread count chosen at the start.
    """
    global _POLICY
    import torch

    before, saved = _POLICY, torch.get_num_threads()
    explicit = requested or env_threads()
    _POLICY = ThreadPolicy(explicit)
    try:
        n = _POLICY.apply()
        if announce:
            how = (
                "as asked" if requested else "OMP_NUM_THREADS" if explicit
                else f"free cores of {available_cores()}, re-checked"
            )  # fmt: skip
            print(f"threads: {n} ({how}; OpenMP waits passively)", file=sys.stderr)
        yield n
    finally:
        _POLICY = before
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def tick() -> None:
    """Called by long loops between steps: re-checks the automatic policy when it is due.

    Torch's thread count is per calling thread in OpenMP, so it must be set from the thread that
    computes; a loop's own step boundary is that place. Outside ``use`` it does nothing.
    """
    if _POLICY is not None:
        _POLICY.tick()
