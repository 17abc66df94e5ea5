"""The thread policy: explicit counts are kept, the automatic one follows the free cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_explicit_threads_are_used_never_rechecked_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: pytest.fail("re-checked"))
    with threads.use(1, announce=False) as n:
        assert n == 1 and torch.get_num_threads() == 1
        threads.tick()
    assert torch.get_num_threads() == before and threads._POLICY is None


def test_omp_num_threads_counts_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: pytest.fail("measured"))
    with threads.use(0, announce=False) as n:
        assert n == 1


def test_main_keeps_the_callers_threads_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from codebook_lens.cli import main

    seen: list[int] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: 2)
    monkeypatch.setattr(
        "codebook_lens.training.pipeline.run_eval", lambda cfg: seen.append(torch.get_num_threads())
    )
    monkeypatch.setattr("codebook_lens.training.pipeline.saved_data_config", lambda m: (None, {}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["eval", str(tmp_path)])  # in-process, no --threads: the caller's 1 thread
        main(["eval", str(tmp_path), "--threads", "2"])
        main(["eval", str(tmp_path)], own_process=True)  # the program: the automatic policy
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 2]


def test_automatic_policy_follows_the_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    loads = iter([0.0, 1.0])
    monkeypatch.setattr(threads, "other_load", lambda since=None: next(loads))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with threads.use(0) as n:
        assert n == 2
        assert "threads: 2" in capsys.readouterr().err
        threads.tick()  # not due yet: nothing measured
        assert torch.get_num_threads() == 2
        assert threads._POLICY is not None
        threads._POLICY.recheck_seconds = 0.0
        threads.tick()  # another process took a core
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
