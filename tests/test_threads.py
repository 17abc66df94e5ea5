"""The thread policy: explicit counts are kept, the automatic one follows the free cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from codebook_lens import threads


def test_the_cli_sets_the_wait_policy_before_torch_loads() -> None:
    code = (
        "import os, sys; import codebook_lens.cli; "
        "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "PASSIVE"], out.stderr


@pytest.mark.parametrize(
    ("cores", "others", "expected"),
    [(2, 0.0, 2), (2, 0.2, 2), (2, 0.5, 1), (2, 1.0, 1), (2, 3.5, 1), (8, 2.9, 5), (1, 0.0, 1)],
)
def test_auto_threads_uses_the_cores_others_leave(cores: int, others: float, expected: int) -> None:
    assert threads.auto_threads(cores, others) == expected


def test_other_load_excludes_our_own_work() -> None:
    start = threads.sample_cpu()
    x = torch.randn(256, 256)
    for _ in range(50):
        x = torch.tanh(x @ x.T / 256)  # our own CPU time
    assert threads.other_load(start) < threads.available_cores()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_thread_counts_name_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="threads=.* is invalid; it must be an integer >= 0"):
        threads.ThreadPolicy(bad)  # type: ignore[arg-type]


def test_explicit_threads_are_used_and_never_rechecked(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert threads.configure(1, announce=False) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: pytest.fail("re-checked"))
        threads.tick()
    finally:
        torch.set_num_threads(before)


def test_automatic_policy_follows_the_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    loads = iter([0.0, 1.0])
    monkeypatch.setattr(threads, "other_load", lambda since=None: next(loads))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    try:
        assert threads.configure(0) == 2
        assert "threads: 2" in capsys.readouterr().err
        threads.tick()  # not due yet: nothing measured
        assert torch.get_num_threads() == 2
        assert threads._POLICY is not None
        threads._POLICY.recheck_seconds = 0.0
        threads.tick()  # another process took a core
        assert torch.get_num_threads() == 1
    finally:
        threads._POLICY = None
        torch.set_num_threads(before)
