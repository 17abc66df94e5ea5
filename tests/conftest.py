"""Shared fixtures: tiny random models of the three architectures, built locally; and a check
that no test leaves a process behind."""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from processes import alive, become_subreaper, children, cmdline, has_proc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

ARCHS = ("gpt2", "gpt_neox", "llama")


def tiny_model(arch: str, *, vocab: int = 64, layers: int = 2, width: int = 32, heads: int = 4):
    """A tiny randomly initialised causal LM of the given architecture (seeded)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            vocab_size=vocab,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=width * 4,
            vocab_size=vocab,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=width * 2,
            vocab_size=vocab,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _own_helpers() -> set[int]:
    """This process's own multiprocessing forkserver and resource tracker: one each per
    interpreter, started on first use and ending with it (there is no call to stop them)."""
    fs = getattr(multiprocessing.forkserver, "_forkserver", None)
    rt = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    pids = {getattr(fs, "_forkserver_pid", None), getattr(rt, "_pid", None)}
    return {p for p in pids if isinstance(p, int)}


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the run if any child process of this one is still alive at the end.

    Orphans are adopted by this process (Linux: a child subreaper), so a worker whose server
    died is seen here too. Worker pools still open are closed first (as at exit); then every
    child must end within a few seconds, except this process's own forkserver and resource
    tracker, which may stay only without children of their own.
    """
    if not has_proc():
        yield
        return
    become_subreaper()
    yield
    pool = sys.modules.get("codebook_lens.codes.pool")
    if pool is not None:
        pool.close_all()
    helpers = _own_helpers()

    def leftovers() -> list[int]:
        mine = [p for p in children(os.getpid()) if p not in helpers]
        return mine + [c for h in helpers for c in children(h)]

    deadline = time.monotonic() + 15
    while (left := [p for p in leftovers() if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        lines = "\n".join(f"  {p}: {cmdline(p)}" for p in left)
        for p in left:  # reported, then ended: a failed run leaves nothing running either
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        pytest.fail(f"{len(left)} child process(es) still alive after the tests:\n{lines}")
