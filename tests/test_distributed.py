"""Two ranks on CPU (gloo, launched by torchrun) keep identical codebooks, equal to one process.

The test launches this file under ``python -m torch.distributed.run --nproc_per_node 2``; each
rank trains the same tiny codebook model on its half of every global batch (k-means init and
dead-code revival on) and saves its whole state. The test then checks that both ranks hold the
same weights, counts and revival clocks, and that they equal a single process trained on the
full global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
STEPS = 6


def _blocks() -> torch.Tensor:
    # Structured rows (counting patterns) so codes are used unevenly and some die.
    base = (torch.arange(16) * 3 + torch.arange(40).view(-1, 1) * 5) % 50 + 1
    return base.long()


def _model() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_model

    from codebook_lens import CodebookConfig, attach_codebooks

    cfg = CodebookConfig(
        num_codes=32,
        k=2,
        placements=["attn_heads", "mlp_out"],
        kmeans_init=True,
        kmeans_iters=2,
        dead_code_steps=1,
    )
    return attach_codebooks(tiny_model("llama"), cfg)  # llama: no dropout, so no RNG in forward


def run_training(rank: int, world: int, out: Path) -> dict[str, torch.Tensor]:
    from codebook_lens.training.data import BatchStream
    from codebook_lens.training.loop import TrainConfig, train

    model = _model()
    stream = BatchStream(_blocks(), GLOBAL_BATCH // world, seed=3, rank=rank, world_size=world)
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=GLOBAL_BATCH // world,
        lr=1e-2,
        model_lr_factor=0.5,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=3,
        log_every=1,
        progress=False,
    )
    train(model, stream, cfg, out)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _worker(out: Path) -> None:
    """Body of each torchrun process."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from codebook_lens.model import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = distributed.rank_world()
    state = run_training(rank, world, out / "run")
    # sample_rows draws the same global rows on every rank as one process would.
    torch.manual_seed(11)
    x = torch.arange(6 * 3, dtype=torch.float32).view(6, 3) + 100 * rank
    state["sampled"] = distributed.sample_rows(x, 5)
    save_file(state, str(out / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two interpreter start-ups plus three short training runs: ~30-100 s
def test_two_gloo_ranks_equal_each_other_and_a_single_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    # only rank 0 wrote the run's files
    assert (tmp_path / "run" / "checkpoints" / "step-00000006").is_dir()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()

    single = run_training(0, 1, tmp_path / "single")
    torch.manual_seed(11)
    x = torch.cat([torch.arange(18, dtype=torch.float32).view(6, 3) + 100 * r for r in range(2)])
    assert torch.equal(r0.pop("sampled"), x[torch.randint(0, 12, (5,))])
    revived = [k for k in single if k.endswith(".revived")]
    assert sum(int(single[k]) for k in revived) > 0, "the test must exercise a revival"
    for k in single:
        a, b = single[k], r0[k]
        if a.is_floating_point():
            assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=0), (
                f"{k}: max diff {(a.double() - b.double()).abs().max():.2e}"
            )
        else:
            assert torch.equal(a, b), f"{k} differs from the single-process run"


def test_helpers_are_plain_ops_without_a_process_group() -> None:
    from codebook_lens.model import distributed

    x = torch.arange(12.0).view(4, 3)
    assert distributed.rank_world() == (0, 1) and not distributed.active()
    assert distributed.all_gather_rows(x) is x and distributed.total_rows(x) == 4
    torch.manual_seed(0)
    a = distributed.sample_rows(x, 3)
    torch.manual_seed(0)
    assert torch.equal(a, x[torch.randint(0, 4, (3,))])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
