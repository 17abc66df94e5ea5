"""Training loop: learning, exact resume, atomic checkpoints, schedules and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model

from codebook_lens import CodebookConfig, CodebookModel, attach_codebooks
from codebook_lens.cli import main
from codebook_lens.training.checkpoint import (
    flatten_state,
    list_checkpoints,
    load_checkpoint_model,
    unflatten_state,
)
from codebook_lens.training.data import BatchStream, fixed_batches
from codebook_lens.training.loop import TrainConfig, build_optimizer, lr_multiplier, train

BLOCKS = torch.randint(1, 64, (48, 16), generator=torch.Generator().manual_seed(1))
# A learnable pattern: each row counts up modulo 60, so loss can fall well below log(64).
PATTERN = (torch.arange(16) + torch.arange(48).view(-1, 1) * 7) % 60 + 1


def codebook_model(arch: str, **kw: Any) -> CodebookModel:
    cfg = CodebookConfig(num_codes=32, k=2, placements=["attn_heads", "mlp_out"], **kw)
    return attach_codebooks(tiny_model(arch), cfg)


def config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "steps": 10,
        "batch_size": 4,
        "lr": 1e-2,
        "model_lr_factor": 0.5,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 5,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "progress": False,
    }
    base.update(kw)
    return TrainConfig(**base)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Stop(Exception):
    pass


def stop_at(n: int) -> Any:
    def cb(step: int, record: dict[str, Any]) -> None:
        if step >= n:
            raise Stop

    return cb


# ------------------------------------------------------------------ learning
def test_loss_decreases(arch: str, tmp_path: Path) -> None:
    model = codebook_model(arch)
    res = train(
        model, BatchStream(PATTERN, 8), config(steps=30, eval_every=0), tmp_path, eval_batches=None
    )
    losses = [r["lm_loss"] for r in res.history if "lm_loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 30
    assert {"loss", "codebook_loss", "lr", "tokens_per_s"} <= set(json.loads(lines[0]))


def test_pretraining_a_plain_model(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    res = train(
        model,
        BatchStream(PATTERN, 8),
        config(steps=25, eval_every=10),
        tmp_path,
        eval_batches=fixed_batches(PATTERN[:8], 4),
    )
    losses = [r["lm_loss"] for r in res.history if "lm_loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert res.eval is not None and set(res.eval) == {"tokens", "base"}


def test_codebooks_only_keeps_the_model_frozen(tmp_path: Path) -> None:
    model = codebook_model("llama")
    before = weights(model)
    train(model, BatchStream(BLOCKS, 4), config(steps=4, model_lr_factor=0.0), tmp_path)
    after = weights(model)
    for k in before:
        if k.startswith("base."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(
        before["codebook_layers.0.codebook"], after["codebook_layers.0.codebook"]
    )
    assert all(p.requires_grad for p in model.parameters()), "freezing must be undone"


def test_kl_and_grad_accum_and_bf16_run(tmp_path: Path) -> None:
    model = codebook_model("gpt2")
    res = train(
        model,
        BatchStream(BLOCKS, 2),
        config(steps=3, kl_weight=0.5, grad_accum=2, bf16=True, schedule="linear"),
        tmp_path,
    )
    recs = [r for r in res.history if "kl" in r]
    assert len(recs) == 3 and all(r["kl"] >= 0 for r in recs)
    assert res.tokens == 3 * 2 * 2 * 16


# ------------------------------------------------------------ exact resume
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_resume_after_interrupt_equals_uninterrupted(arch: str, tmp_path: Path) -> None:
    """Interrupted at step 7 (last checkpoint: step 6), resumed to 10: bitwise equal."""
    kw = {"dead_code_steps": 2}  # revivals draw from the RNG and the recent-input buffer
    evals = fixed_batches(BLOCKS[:8], 4)

    full = codebook_model(arch, **kw)
    full.base.config.resid_pdrop = 0.1  # dropout (where used) also draws from the RNG
    ref = train(
        full,
        BatchStream(BLOCKS, 4, seed=5),
        config(grad_accum=2),
        tmp_path / "a",
        eval_batches=evals,
    )

    part = codebook_model(arch, **kw)
    with pytest.raises(Stop):
        train(
            part,
            BatchStream(BLOCKS, 4, seed=5),
            config(grad_accum=2),
            tmp_path / "b",
            eval_batches=evals,
            callbacks=[stop_at(7)],
        )
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000006"]

    resumed = codebook_model(arch, **kw)  # a fresh process would rebuild the model like this
    res = train(
        resumed,
        BatchStream(BLOCKS, 4, seed=5),
        config(grad_accum=2),
        tmp_path / "b",
        eval_batches=evals,
        resume=True,
    )
    assert res.step == 10 and res.tokens == ref.tokens
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sum(int(layer.revived) for layer in resumed.codebooks.values()) > 0
    # metrics.jsonl has each step once, as if never interrupted
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    ref_steps = [
        json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == ref_steps


def test_resume_without_checkpoint_starts_over_and_fresh_runs_refuse_old_ones(
    tmp_path: Path,
) -> None:
    ref = codebook_model("gpt2")
    train(ref, BatchStream(BLOCKS, 4), config(steps=3), tmp_path / "a")
    # killed before its first checkpoint: --resume trains from step 0 like the first attempt
    again = codebook_model("gpt2")
    res = train(again, BatchStream(BLOCKS, 4), config(steps=3), tmp_path / "b", resume=True)
    assert res.step == 3
    a, b = weights(ref), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(codebook_model("gpt2"), BatchStream(BLOCKS, 4), config(steps=3), tmp_path / "a")


# -------------------------------------------------------------- checkpoints
def test_checkpoint_rebuilds_the_model_without_pickle(tmp_path: Path) -> None:
    model = codebook_model("gpt_neox")
    res = train(model, BatchStream(BLOCKS, 4), config(steps=4, checkpoint_every=2), tmp_path)
    assert res.checkpoint is not None and res.checkpoint.name == "step-00000004"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]  # keep 1
    names = {p.name for p in res.checkpoint.iterdir()}
    assert names == {
        "weights.safetensors",
        "config.json",
        "codebook_config.json",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "trainer_state.json",
    }
    for p in res.checkpoint.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"
    rebuilt = load_checkpoint_model(res.checkpoint)
    assert isinstance(rebuilt, CodebookModel)
    a, b = weights(model), weights(rebuilt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_while_writing_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    model = codebook_model("gpt2")
    train(model, BatchStream(BLOCKS, 4), config(steps=3, checkpoint_every=3), tmp_path)
    good = list_checkpoints(tmp_path)[-1]
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    real = safetensors.torch.save_file

    def failing(tensors: Any, path: str, *a: Any, **kw: Any) -> None:
        if "rng" in path:  # weights and optimizer already written: the folder is half done
            raise OSError("disk full")
        real(tensors, path, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        train(
            model,
            BatchStream(BLOCKS, 4),
            config(steps=6, checkpoint_every=3),
            tmp_path,
            resume=True,
        )
    assert list_checkpoints(tmp_path) == [good]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]


def test_optimizer_state_round_trips_through_json_and_tensors() -> None:
    model = codebook_model("gpt2")
    opt = build_optimizer(model, config())
    model(input_ids=BLOCKS[:2], labels=BLOCKS[:2]).loss.backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(flatten_state(opt.state_dict(), tensors, "opt")))
    back = unflatten_state(tree, tensors)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    assert back["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        for key, v in st.items():
            assert torch.equal(back["state"][i][key], v)
    with pytest.raises(ValueError, match="tensor 'opt.x' is missing"):
        unflatten_state({"__tensor__": "opt.x"}, {})


def test_learning_rate_schedules() -> None:
    c = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, c) == pytest.approx(0.1)
    assert lr_multiplier(9, c) == pytest.approx(1.0)
    assert lr_multiplier(10, c) == pytest.approx(1.0)
    assert lr_multiplier(60, c) == pytest.approx(0.55)
    assert lr_multiplier(110, c) == pytest.approx(0.1)
    lin = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.0, schedule="linear")
    assert lr_multiplier(60, lin) == pytest.approx(0.5)
    assert lr_multiplier(60, TrainConfig(warmup_steps=10, schedule="constant")) == 1.0


def test_bad_train_config() -> None:
    with pytest.raises(ValueError, match="schedule='cos' is invalid; choose 'cosine'"):
        TrainConfig(schedule="cos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr=0.0 is invalid"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="kl_weight > 0 needs a model with codebooks"):
        train(tiny_model("gpt2"), BatchStream(BLOCKS, 4), TrainConfig(kl_weight=1.0), "unused")


# -------------------------------------------------------------------- CLI
TINY = ["--block-size", "16", "--batch-size", "4", "--no-progress", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "markets",
        "rose",
        "and",
        "banks",
        "fell",
        "in",
        "the",
        "park",
    ]
    root = tmp_path_factory.mktemp("corpus")
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(10):
            text = " ".join(rng.choice(words) for _ in range(60))
            (root / label / f"{i}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pretrained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    code = main(
        [
            "pretrain",
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--tokenizer",
            "bpe:300",
            "--num-layers",
            "1",
            "--width",
            "32",
            "--heads",
            "2",
            "--context",
            "32",
            "--steps",
            "6",
            *TINY,
        ]
    )
    assert code == 0
    return out


def test_cli_pretrain_train_eval(
    pretrained: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (pretrained / "model" / "model.safetensors").is_file()
    assert (pretrained / "model" / "tokenizer.json").is_file()
    out = tmp_path / "cb"
    assert (
        main(
            [
                "train",
                "--base",
                str(pretrained),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--num-codes",
                "16",
                "--k",
                "2",
                "--steps",
                "4",
                "--checkpoint-every",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    model = CodebookModel.from_pretrained(out / "model")
    assert list(model.codebooks) == ["layers.0.attn_heads"]
    assert (
        json.loads((out / "model" / "run_config.json").read_text())["configs"]["codebook"][
            "num_codes"
        ]
        == 16
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"loss", "accuracy", "perplexity"} <= set(metrics["base"])
    assert {"loss", "accuracy"} <= set(metrics["codebook"])
    assert set(metrics["codebooks"]["layers.0.attn_heads"]) >= {"mse", "dead_fraction", "entropy"}
    saved = json.loads((out / "model" / "eval.json").read_text())
    assert saved["codebook"]["loss"] == pytest.approx(metrics["codebook"]["loss"], rel=1e-6)
    # --resume extends the run; the stored data source and configs are reused.
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert list_checkpoints(out)[-1].name == "step-00000006"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda c, b, t: ["--data", str(t / "missing")], "no such file or folder"),
        (lambda c, b, t: ["--data", str(t / "empty")], "no .txt"),
        (lambda c, b, t: ["--data", str(t / "latin1")], "not valid UTF-8"),
        (lambda c, b, t: ["--data", str(c), "--block-size", "64"], "block_size=64 is invalid"),
        (lambda c, b, t: ["--data", str(c), "--base", "nobody/no-such-model"], "cannot load"),
        (lambda c, b, t: ["--data", str(c), "--num-codes", "0"], "num_codes=0 is invalid"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(
    make_args: Any,
    message: str,
    pretrained: Path,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "x.txt").write_bytes(b"na\xefve " * 50)
    extra = make_args(corpus, pretrained, tmp_path)
    args = [
        "train",
        "--base",
        str(pretrained),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--no-progress",
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_used_out_dir(
    pretrained: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "--data", str(corpus), "--out", str(pretrained)]) == 2
    assert "exists and is not empty; pass --resume" in capsys.readouterr().err


def test_bench_train_tiny_runs() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_train.py"), "--tiny", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| base " in proc.stdout and "| codebook C=32 " in proc.stdout
    assert "codebook/base throughput" in proc.stdout


# ------------------------------------------------------------- crash safety
@pytest.fixture(scope="module")
def crash_base(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved base model with its own BPE tokenizer."""
    from codebook_lens.model.tokenizer import load_tokenizer
    from codebook_lens.training.data import load_documents

    tok = load_tokenizer("bpe:300", load_documents(str(corpus)))
    out = tmp_path_factory.mktemp("crash") / "base"
    tiny_model("gpt2", vocab=300, layers=1, width=32, heads=2).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _wait_for(proc: Any, cond: Any, timeout: float = 120.0) -> bool:
    """Poll ``cond()`` every millisecond or so; False if the process ended first."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("timed out waiting for the training subprocess")


@pytest.mark.slow  # four interpreter start-ups: ~30-60 s on 2 cores
def test_sigkill_at_random_moments_then_resume_gives_the_same_weights(
    crash_base: Path, corpus: Path, tmp_path: Path
) -> None:
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(root / "src"),
        # Each checkpoint write stays open 0.4 s, so polling sees it even on a fast machine.
        "CODEBOOK_LENS_CHECKPOINT_WRITE_DELAY": "0.4",
    }
    base_cmd = [
        sys.executable, "-m", "codebook_lens.cli", "train", "--base", str(crash_base),
        "--data", str(corpus), "--num-codes", "16", "--k", "2", "--dead-code-steps", "2",
        "--steps", "16", "--checkpoint-every", "2", "--eval-every", "0", *TINY,
    ]  # fmt: skip
    ref = tmp_path / "ref"  # uninterrupted reference, in this process with the same 1 thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*base_cmd[3:], "--out", str(ref)]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "crash"
    ckpts = out / "checkpoints"
    rng = random.Random(0)

    def writing(min_step: int) -> Any:
        def cond() -> bool:
            return any(int(p.name[10:18]) >= min_step for p in ckpts.glob(".tmp-step-*"))

        return cond

    def reached(min_step: int) -> Any:
        def cond() -> bool:
            found = list_checkpoints(out)
            return bool(found) and int(found[-1].name[5:]) >= min_step

        return cond

    # kill 1: during the very first checkpoint write (nothing complete yet: resume restarts);
    # kill 2: at a random moment after step 6; kill 3: during a later checkpoint write.
    plan = [writing(2), reached(6), writing(10)]
    killed_mid_write = 0
    for attempt, cond in enumerate(plan):
        log = open(tmp_path / f"attempt{attempt}.log", "w")  # noqa: SIM115
        cmd = [*base_cmd, "--out", str(out), *(["--resume"] if attempt else [])]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert _wait_for(proc, cond), (tmp_path / f"attempt{attempt}.log").read_text()[-2000:]
            if attempt == 1:
                time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        assert proc.returncode == -signal.SIGKILL
        killed_mid_write += any(ckpts.glob(".tmp-step-*"))
    final = subprocess.run(
        [*base_cmd, "--out", str(out), "--resume"], env=env, capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert killed_mid_write >= 1, "no kill landed inside a checkpoint write"

    for name in ("model.safetensors", "codebooks.safetensors"):
        a = load_file(str(ref / "model" / name))
        b = load_file(str(out / "model" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after kills and resumes"

    def steps(run: Path) -> list[int]:
        return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert steps(out) == steps(ref)  # each record once, as if never killed
