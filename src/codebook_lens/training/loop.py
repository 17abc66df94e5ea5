"""Training loop for codebook models (and plain causal LMs), with exact, crash-safe resume.

``train(model, batches, config, out_dir)`` runs AdamW on ``LM loss + codebook loss (+ KL to the
base model)`` with warmup and a cosine / linear / constant schedule, gradient accumulation,
optional bf16 autocast and gradient clipping. It logs to ``out_dir/metrics.jsonl`` (and
TensorBoard when installed), evaluates every ``eval_every`` steps, and writes a checkpoint every
``checkpoint_every`` steps to ``out_dir/checkpoints/step-NNNNNNNN/`` (``checkpoint.py``).

The learning-rate schedule is a pure function of the step, so the step is the whole scheduler
state. ``resume=True`` restores the newest checkpoint and continues on the next batch: an
interrupted and resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in DDP, each rank
reads its shard of every global batch, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from codebook_lens import threads
from codebook_lens.config import check_choice, check_int, check_range, write_json_atomic
from codebook_lens.model.codebook_model import CodebookModel
from codebook_lens.model.distributed import rank_world
from codebook_lens.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from codebook_lens.training.evaluate import evaluate, flatten_metrics

Schedule = Literal["cosine", "linear", "constant"]


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing of one training run."""

    steps: int = 1000
    """Optimizer steps to train for (in total, counting steps before a resume)."""

    batch_size: int = 16
    """Sequences per micro-batch (per process under torchrun)."""

    grad_accum: int = 1
    """Micro-batches accumulated into each optimizer step."""

    lr: float = 1e-3
    """Peak learning rate of the codebooks (and of every parameter of a plain model)."""

    model_lr_factor: float = 0.1
    """Model learning rate = lr * model_lr_factor; 0 freezes the model (codebooks only)."""

    weight_decay: float = 0.01
    """AdamW weight decay on the model's matrices (never on codebooks, biases or norms)."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    warmup_steps: int = 50
    """Steps of linear learning-rate warmup from 0."""

    schedule: Schedule = "cosine"
    """Decay after warmup: 'cosine', 'linear' or 'constant'."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and linear schedules)."""

    kl_weight: float = 0.0
    """Weight of KL(base model || codebook model) on the next-token distributions (0 = off)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    bf16: bool = False
    """Run forward passes under bfloat16 autocast (weights and optimizer stay float32)."""

    eval_every: int = 200
    """Evaluate on the held-out batches every this many steps (0 = only at the end)."""

    eval_batches: int = 20
    """Held-out batches per evaluation."""

    checkpoint_every: int = 200
    """Write a checkpoint every this many steps (0 = only at the end)."""

    keep_checkpoints: int = 1
    """How many of the newest checkpoints to keep."""

    log_every: int = 10
    """Log training metrics every this many steps."""

    seed: int = 0
    """Seed of every RNG (torch, numpy, random), the data order and the codebook init."""

    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' (used by the CLI)."""

    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            check_int(name, getattr(self, name), 0)
        check_int("log_every", self.log_every, 1)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("model_lr_factor", self.model_lr_factor, 0.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("beta1", self.beta1, 0.0, 1.0)
        check_range("beta2", self.beta2, 0.0, 1.0)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("kl_weight", self.kl_weight, 0.0)
        check_range("max_grad_norm", self.max_grad_norm, 0.0)
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise ValueError(
                f"device={self.device!r} is invalid; choose 'auto', 'cpu', 'cuda' or 'cuda:N'"
            )


class Batches(Protocol):
    """What ``train`` reads: an iterator of ``(batch, seq)`` int64 input ids with a state."""

    def __next__(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Callback = Callable[[int, dict[str, Any]], None]
"""Called as ``callback(step, record)`` with every record written to metrics.jsonl (rank 0)."""


@dataclass
class TrainResult:
    """What a finished ``train`` call returns."""

    step: int
    """Optimizer steps done (in total)."""
    tokens: int
    """Training tokens consumed (all ranks together)."""
    seconds: float
    """Wall time of this call."""
    train_loss: float | None
    """LM loss of the last step."""
    eval: dict[str, Any] | None = None
    """The last evaluation (see ``evaluate.evaluate``)."""
    checkpoint: Path | None = None
    """The last checkpoint written (rank 0)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every metrics record of this call."""


# ----------------------------------------------------------------- schedule
def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Learning-rate factor (0..1) for optimizer step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with separate groups: codebooks (lr), model matrices (decayed) and the rest.

    With ``model_lr_factor == 0`` the model's parameters are frozen (``requires_grad=False``).
    Each group carries ``lr_scale``; the schedule sets ``lr = config.lr * lr_scale * mult``.
    """
    if isinstance(model, CodebookModel):
        codebook = model.codebook_parameters()
        ids = {id(p) for p in codebook}
        rest = [p for p in model.parameters() if id(p) not in ids]
        scale = config.model_lr_factor
        if scale == 0:
            for p in rest:
                p.requires_grad_(False)
        groups: list[dict[str, Any]] = [
            {"params": codebook, "weight_decay": 0.0, "lr_scale": 1.0, "name": "codebooks"}
        ]
    else:
        rest, scale, groups = list(model.parameters()), 1.0, []
    rest = [p for p in rest if p.requires_grad]
    if scale > 0:
        decay = [p for p in rest if p.dim() >= 2]
        other = [p for p in rest if p.dim() < 2]
        groups.append(
            {
                "params": decay,
                "weight_decay": config.weight_decay,
                "lr_scale": scale,
                "name": "model",
            }
        )
        groups.append(
            {"params": other, "weight_decay": 0.0, "lr_scale": scale, "name": "model_no_decay"}
        )
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    mult = lr_multiplier(step, config)
    for g in optimizer.param_groups:
        g["lr"] = config.lr * g.get("lr_scale", 1.0) * mult
    return config.lr * mult


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------- logging
class MetricsLog:
    """Append records to ``metrics.jsonl`` (and TensorBoard when installed); rank 0 only."""

    def __init__(self, out_dir: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb: Any = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def _truncate(self, step: int) -> None:
        """Drop records after ``step`` (logged after the checkpoint we resume from) and any
        partial last line left by a crash."""
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in flatten_metrics(record).items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -------------------------------------------------------------------- loop
def _kl_to_base(model: CodebookModel, ids: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of KL(base || codebook model) for next-token distributions."""
    with torch.no_grad(), model.disabled():
        ref = model(input_ids=ids).logits.float().log_softmax(-1)
    logp = logits.float().log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean()


def train(
    model: nn.Module,
    batches: Batches,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    eval_batches: Sequence[Tensor] | Iterable[Tensor] | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``model`` (a ``CodebookModel`` or a plain HF causal LM) on ``batches``.

    ``batches`` yields ``(batch, seq)`` input ids and has ``state_dict``/``load_state_dict``
    (``data.BatchStream``). ``eval_batches`` is re-iterated at every evaluation (a list).
    With ``resume=True`` the newest checkpoint in ``out_dir`` is restored first (none yet: the
    run starts from step 0, as it first did); without it, ``out_dir`` must not hold checkpoints.
    """
    out = Path(out_dir)
    rank, world = rank_world()
    main = rank == 0
    device = next(model.parameters()).device
    if config.kl_weight and not isinstance(model, CodebookModel):
        raise ValueError("kl_weight > 0 needs a model with codebooks (the base is the reference)")
    trainable_before = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    step, tokens, resume_step = _restore(out, model, optimizer, batches, config, resume, main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", dataclasses.asdict(config))
    log = MetricsLog(out, enabled=main, resume_step=resume_step)
    wrapped = _wrap_ddp(model, device) if world > 1 else model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    was_training = model.training
    model.train()
    run = _Run(out, model, optimizer, batches, config, world, log, eval_batches, callbacks, step)
    try:
        while step < config.steps:
            lr = set_lr(optimizer, step, config)
            for micro in range(config.grad_accum):
                ids = next(batches).to(device, non_blocking=True)
                no_sync = world > 1 and micro < config.grad_accum - 1
                run.window.add(_forward_backward(model, wrapped, ids, config, no_sync), config)
                run.window.tokens += ids.numel() * world
            grad_norm = _optimizer_step(model, optimizer, params, config)
            step += 1
            threads.tick()
            tokens += ids.numel() * world * config.grad_accum
            run.bar.update(1)
            run.log_and_evaluate(step, lr, tokens, grad_norm)
            if _due(config.checkpoint_every, step, config.steps):
                run.checkpoint(step, tokens)
    finally:
        run.bar.close()
        log.close()
        model.train(was_training)
        for p in trainable_before:  # undo the freezing of "codebooks only" training
            p.requires_grad_(True)
    result = run.result
    result.step, result.tokens = step, tokens
    result.seconds = time.perf_counter() - run.started
    return result


class _Run:
    """What the steps of one ``train`` call share: where they log, evaluate and checkpoint."""

    def __init__(
        self,
        out: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Batches,
        config: TrainConfig,
        world: int,
        log: MetricsLog,
        eval_batches: Sequence[Tensor] | Iterable[Tensor] | None,
        callbacks: Sequence[Callback],
        step: int,
    ) -> None:
        self.out, self.model, self.optimizer, self.batches = out, model, optimizer, batches
        self.config, self.world, self.main, self.log = config, world, log.enabled, log
        self.eval_batches, self.callbacks = eval_batches, callbacks
        self.result = TrainResult(step=step, tokens=0, seconds=0.0, train_loss=None)
        self.started = time.perf_counter()
        self.window = _Window(self.started)
        self.bar = tqdm(
            total=config.steps,
            initial=step,
            desc="train",
            disable=not (self.main and config.progress),
            dynamic_ncols=True,
        )

    def log_and_evaluate(self, step: int, lr: float, tokens: int, grad_norm: Tensor | None) -> None:
        """After optimizer step ``step``: the metrics record and the evaluation when due."""
        config, result = self.config, self.result
        records: list[dict[str, Any]] = []
        if _due(config.log_every, step, config.steps):
            rec = self.window.record(step, lr, tokens, config.log_every, grad_norm)
            result.train_loss = rec["lm_loss"]
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            records.append(rec)
        if (
            self.eval_batches is not None
            and self.main
            and _due(config.eval_every, step, config.steps)
        ):
            t0 = time.perf_counter()
            result.eval = evaluate(self.model, self.eval_batches, max_batches=config.eval_batches)
            self.model.train()
            records.append({"step": step, "eval": result.eval})
            self.window.start += time.perf_counter() - t0  # keep eval time out of tokens/s
        for rec in records:
            self.log.write(rec)
            result.history.append(rec)
            for cb in self.callbacks:
                cb(step, rec)

    def checkpoint(self, step: int, tokens: int) -> None:
        """Write a checkpoint (rank 0); every rank waits for it."""
        if self.main:
            self.result.checkpoint = save_checkpoint(
                self.out,
                self.model,
                self.optimizer,
                self.batches,
                step=step,
                tokens=tokens,
                train_config=dataclasses.asdict(self.config),
                keep=self.config.keep_checkpoints,
            )
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _due(every: int, step: int, last: int) -> bool:
    """Whether an every-``every``-steps action (0 = only at the end) runs after ``step``."""
    return bool(every and step % every == 0) or step == last


def _restore(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    config: TrainConfig,
    resume: bool,
    main: bool,
) -> tuple[int, int, int | None]:
    """``(step, tokens, resume_step)``: the newest checkpoint's, or a fresh, seeded start."""
    found = list_checkpoints(out) if resume else []
    if resume and not found and main:
        # Killed before its first checkpoint: the run restarts from step 0, as it began.
        print(f"{out}: no checkpoint yet; starting from step 0", file=sys.stderr)
    if not found:
        if not resume and list_checkpoints(out):
            raise ValueError(
                f"{out}: already holds checkpoints of a training run; resume it or choose "
                "another output directory"
            )
        seed_everything(config.seed)
        return 0, 0, None
    state = load_checkpoint(found[-1], model, optimizer, batches)
    saved = state.get("train_config", {})
    changed = {
        k: (saved.get(k), v)
        for k, v in dataclasses.asdict(config).items()
        if k in saved and saved[k] != v and k not in ("steps", "progress", "device")
    }
    if changed and main:
        print(f"warning: resuming with changed settings {changed}", file=sys.stderr)
    return state["step"], state["tokens"], state["step"]


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, leaving the codebook buffers to the codebooks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Codebook buffers (usage counts, recent inputs) are synchronised by the codebook
    # layers themselves; DDP must not overwrite them with rank 0's every forward.
    newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_buffer_sync: dict[str, Any] = {
        "forward_sync_buffers" if newer else "broadcast_buffers": False
    }
    return DDP(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


def _forward_backward(
    model: nn.Module, wrapped: nn.Module, ids: Tensor, config: TrainConfig, no_sync: bool
) -> dict[str, Tensor]:
    """One micro-batch: forward, loss terms, backward of their sum / ``grad_accum``.

    ``no_sync``: a DDP micro-batch before the last one (gradients are all-reduced once).
    """
    sync = wrapped.no_sync() if no_sync else contextlib.nullcontext()  # type: ignore[operator]
    autocast = (
        torch.autocast(ids.device.type, dtype=torch.bfloat16)
        if config.bf16
        else contextlib.nullcontext()
    )
    with sync:
        with autocast:
            output = wrapped(input_ids=ids, labels=ids)
            parts = {"lm_loss": output.loss.float()}
            if isinstance(model, CodebookModel):
                parts["codebook_loss"] = model.codebook_loss().float()
                if config.kl_weight:
                    parts["kl"] = _kl_to_base(model, ids, output.logits)
        loss = parts["lm_loss"] + parts.get("codebook_loss", 0.0)
        if "kl" in parts:
            loss = loss + config.kl_weight * parts["kl"]
        (loss / config.grad_accum).backward()
    return parts


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    config: TrainConfig,
) -> Tensor | None:
    """Clip, step, zero the gradients, then the codebooks' own step (dead-code clocks).

    Returns the gradient norm before clipping, or ``None`` without clipping.
    """
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if config.max_grad_norm > 0
        else None
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_fn = getattr(model, "step", None)
    if callable(step_fn):
        step_fn()
    return grad_norm


@dataclass
class _Window:
    """Training metrics summed since the last log record."""

    start: float
    """``time.perf_counter()`` when the window opened (moved on by evaluation time)."""
    tokens: int = 0
    """Tokens trained on in the window (all ranks)."""
    sums: dict[str, Tensor] = field(default_factory=dict)
    """Loss terms summed over the window's steps (each step's micro-batches averaged)."""

    def add(self, parts: dict[str, Tensor], config: TrainConfig) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() / config.grad_accum  # type: ignore[assignment]

    def record(
        self, step: int, lr: float, tokens: int, log_every: int, grad_norm: Tensor | None
    ) -> dict[str, Any]:
        """The metrics record for ``step``; then the window starts afresh."""
        now = time.perf_counter()
        n_steps = log_every if step % log_every == 0 else step % log_every
        rec: dict[str, Any] = {"step": step, "lr": lr, "tokens": tokens}
        rec.update({k: float(v) / n_steps for k, v in self.sums.items()})
        rec["loss"] = rec["lm_loss"] + rec.get("codebook_loss", 0.0)
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        rec["tokens_per_s"] = self.tokens / max(now - self.start, 1e-9)
        self.sums, self.start, self.tokens = {}, now, 0
        return rec
