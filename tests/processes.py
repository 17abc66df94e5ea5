"""The process tree from ``/proc`` (Linux): children, descendants, their command lines."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def has_proc() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/stat").is_file()


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of ``pid``, or None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (zombies included)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == pid:
                out.append(int(entry.name))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """Children of ``pid``, their children, and so on (zombies included)."""
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return sorted(out)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; it is reaped here if it is our child)."""
    st = _stat(pid)
    if st is None:
        return False
    if st[0] == "Z":
        if st[1] == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        return False
    return True


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs (at most ``timeout`` s); the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux), so that a process a test left
    behind stays visible here after its own parent exits."""
    if not has_proc():
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    return False
