"""Training loop for codebook models (and plain causal LMs), with exact, crash-safe resume.

``train(model, batches, config, out_dir)`` runs AdamW on ``LM loss + codebook loss (+ KL to the
base model)`` with warmup and a cosine / linear / constant schedule, gradient accumulation,
optional bf16 autocast and gradient clipping. It logs to ``out_dir/metrics.jsonl`` (and
TensorBoard when installed), evaluates every ``eval_every`` steps, and writes a checkpoint every
``checkpoint_every`` steps to ``out_dir/checkpoints/step-NNNNNNNN/``:

- ``weights.safetensors``: the whole model's state (base weights, codebooks and their buffers);
- ``config.json`` + ``codebook_config.json``: enough to rebuild the model (``load_checkpoint_model``);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW state, tensors and structure apart;
- ``rng.safetensors`` + ``trainer_state.json``: RNG states, step, data position, config.

A checkpoint is assembled in a hidden temporary folder, fsynced and renamed into place; older
ones are deleted only afterwards, so a crash at any moment leaves the last good checkpoint
intact. The learning-rate schedule is a pure function of the step, so the step is the whole
scheduler state. ``resume=True`` restores everything and continues on the next batch: an
interrupted and resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in DDP, each rank
reads its shard of every global batch, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .attach import CONFIG_NAME, CodebookModel, attach_codebooks
from .config import CodebookConfig, check_choice, check_range, read_json, write_json_atomic
from .flags import configs_from_args

CHECKPOINT_FORMAT = 1
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
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_int("log_every", self.log_every, 1)
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


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")


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


# -------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


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


# ------------------------------------------------------ state <-> safetensors
def flatten_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "") -> Any:
    """Split a nested state (dicts, lists, tuples, numbers, tensors) into JSON and tensors.

    Tensors go to ``tensors[name]`` and leave ``{"__tensor__": name}``; dicts with non-string keys
    and tuples are tagged so ``unflatten_state`` restores them exactly. No pickle involved.
    """
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {
                "__dict__": {k: flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
            }
        items = []
        for k, v in obj.items():
            if not isinstance(k, int | str):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {prefix}")
            items.append([k, flatten_state(v, tensors, f"{prefix}.{k}")])
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {
            "__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        }
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, Tensor], *, source: str = "state") -> Any:
    """Inverse of ``flatten_state``; missing tensors raise ``ValueError`` naming ``source``."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors, source=source) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            name = obj["__tensor__"]
            if name not in tensors:
                raise ValueError(f"{source}: tensor {name!r} is missing")
            return tensors[name]
        if set(obj) == {"__dict__"} and isinstance(obj["__dict__"], dict):
            return {
                k: unflatten_state(v, tensors, source=source) for k, v in obj["__dict__"].items()
            }
        if set(obj) == {"__items__"} and isinstance(obj["__items__"], list):
            return {k: unflatten_state(v, tensors, source=source) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"} and isinstance(obj["__tuple__"], list):
            return tuple(unflatten_state(v, tensors, source=source) for v in obj["__tuple__"])
        raise ValueError(f"{source}: unexpected object with keys {sorted(obj)}")
    return obj


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {
            "kind": kind,
            "keys": [int(x) for x in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any], source: str) -> None:
    try:
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        n = meta["numpy"]
        np.random.set_state(
            (n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{source}: bad RNG state ({type(e).__name__}: {e})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------- checkpoints
def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CHECKPOINT_FILES = (
    "weights.safetensors",
    "config.json",
    "optimizer.safetensors",
    "optimizer.json",
    "rng.safetensors",
    "trainer_state.json",
)


def _host_state(model: nn.Module) -> dict[str, Any]:
    """Host-side counters of codebook layers that are not buffers (ring-buffer write position)."""
    if not isinstance(model, CodebookModel):
        return {}
    return {name: {"recent_ptr": layer._recent_ptr} for name, layer in model.codebooks.items()}


def _load_host_state(model: nn.Module, state: dict[str, Any]) -> None:
    if isinstance(model, CodebookModel):
        for name, layer in model.codebooks.items():
            if name in state:
                layer._recent_ptr = int(state[name]["recent_ptr"])


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    config: TrainConfig,
    *,
    step: int,
    tokens: int,
) -> Path:
    """Write ``out_dir/checkpoints/step-{step:08d}`` atomically and prune older checkpoints."""
    from safetensors.torch import save_file, save_model

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "weights.safetensors"), metadata={"format": "pt"})
        base = model.base if isinstance(model, CodebookModel) else model
        base_cfg = getattr(base, "config", None)
        if base_cfg is None or not hasattr(base_cfg, "to_json_string"):
            raise TypeError("the model has no Hugging Face config; cannot checkpoint it")
        (tmp / "config.json").write_text(base_cfg.to_json_string(), encoding="utf-8")
        if isinstance(model, CodebookModel):
            write_json_atomic(tmp / CONFIG_NAME, model.manifest())
        opt_tensors: dict[str, Tensor] = {}
        opt_tree = flatten_state(optimizer.state_dict(), opt_tensors, "optimizer")
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json_atomic(tmp / "optimizer.json", opt_tree)
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        # Fault-injection aid: crash tests widen the write window so a kill lands inside it
        # however fast the machine is.
        delay = float(os.environ.get("CODEBOOK_LENS_CHECKPOINT_WRITE_DELAY", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        # Written last: its presence marks the folder complete.
        write_json_atomic(
            tmp / "trainer_state.json",
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "tokens": tokens,
                "data": batches.state_dict(),
                "rng": rng_meta,
                "host_state": _host_state(model),
                "train_config": dataclasses.asdict(config),
            },
        )
        _fsync_tree(tmp)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(out_dir)[: -config.keep_checkpoints]:
        shutil.rmtree(stale, ignore_errors=True)
    for junk in root.glob(".tmp-step-*"):  # left by an earlier crash mid-write
        if not junk.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(junk, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        complete = all((p / f).is_file() for f in CHECKPOINT_FILES)
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and complete:
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Batches | None = None,
) -> dict[str, Any]:
    """Restore weights (and optimizer, data position, RNG) from a checkpoint folder.

    Returns the ``trainer_state.json`` object. Errors name the file at fault.
    """
    from safetensors.torch import load_model

    from .attach import load_safetensors

    path = Path(path)
    state = read_json(path / "trainer_state.json")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'trainer_state.json'}: not a codebook-lens checkpoint")
    for key, tp in (("step", int), ("tokens", int), ("data", dict), ("rng", dict)):
        if not isinstance(state.get(key), tp):
            raise ValueError(
                f"{path / 'trainer_state.json'}: field {key!r} is missing or not a {tp.__name__}"
            )
    weights = path / "weights.safetensors"
    load_safetensors(weights)  # clear error for a truncated or corrupted file
    try:
        load_model(model, str(weights), device=str(next(model.parameters()).device))
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit this model ({e})") from None
    _load_host_state(model, state.get("host_state", {}))
    if optimizer is not None:
        tree = read_json(path / "optimizer.json")
        tensors = load_safetensors(path / "optimizer.safetensors")
        opt_state = unflatten_state(tree, tensors, source=str(path / "optimizer.json"))
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path / 'optimizer.json'}: does not fit this optimizer ({e})"
            ) from None
    if batches is not None:
        batches.load_state_dict(state["data"])
    _set_rng_state(load_safetensors(path / "rng.safetensors"), state["rng"], str(path))
    return state


def load_checkpoint_model(path: str | os.PathLike[str], device: str | None = None) -> nn.Module:
    """Rebuild a model (a ``CodebookModel`` or a plain causal LM) from a checkpoint alone."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a checkpoint folder")
    base_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    base = AutoModelForCausalLM.from_config(base_cfg)
    model: nn.Module = base
    if (path / CONFIG_NAME).is_file():
        manifest = read_json(path / CONFIG_NAME)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise ValueError(f"{path / CONFIG_NAME}: field 'config' is missing")
        cfg = CodebookConfig.from_dict(manifest["config"], source=str(path / CONFIG_NAME))
        model = attach_codebooks(base, cfg)
    if device is not None:
        model = model.to(device)
    from .attach import load_safetensors

    load_safetensors(path / "weights.safetensors")
    try:
        load_model(model, str(path / "weights.safetensors"), device=device or "cpu")
    except RuntimeError as e:
        raise ValueError(
            f"{path / 'weights.safetensors'}: does not fit the saved config ({e})"
        ) from None
    _load_host_state(model, read_json(path / "trainer_state.json").get("host_state", {}))
    return model


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
            from .evaluate import flatten_metrics

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
    from tqdm import tqdm

    from .evaluate import evaluate

    out = Path(out_dir)
    rank, world = dist_info()
    main = rank == 0
    device = next(model.parameters()).device
    is_cb = isinstance(model, CodebookModel)
    if config.kl_weight and not is_cb:
        raise ValueError("kl_weight > 0 needs a model with codebooks (the base is the reference)")
    trainable_before = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    step, tokens, resume_step = 0, 0, None
    found = list_checkpoints(out) if resume else []
    if resume and not found and main:
        # Killed before its first checkpoint: the run restarts from step 0, as it began.
        print(f"{out}: no checkpoint yet; starting from step 0", file=sys.stderr)
    if found:
        state = load_checkpoint(found[-1], model, optimizer, batches)
        step, tokens, resume_step = state["step"], state["tokens"], state["step"]
        saved = state.get("train_config", {})
        changed = {
            k: (saved.get(k), v)
            for k, v in dataclasses.asdict(config).items()
            if k in saved and saved[k] != v and k not in ("steps", "progress", "device")
        }
        if changed and main:
            print(f"warning: resuming with changed settings {changed}", file=sys.stderr)
    else:
        if not resume and list_checkpoints(out):
            raise ValueError(
                f"{out}: already holds checkpoints of a training run; resume it or choose "
                "another output directory"
            )
        seed_everything(config.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", dataclasses.asdict(config))
    log = MetricsLog(out, enabled=main, resume_step=resume_step)

    wrapped: nn.Module = model
    if world > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # Codebook buffers (usage counts, recent inputs) are synchronised by the codebook
        # layers themselves; DDP must not overwrite them with rank 0's every forward.
        newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_buffer_sync: dict[str, Any] = {
            "forward_sync_buffers" if newer else "broadcast_buffers": False
        }
        wrapped = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if config.bf16
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.train()
    result = TrainResult(step=step, tokens=tokens, seconds=0.0, train_loss=None)
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    sums: dict[str, Tensor] = {}
    bar = tqdm(
        total=config.steps,
        initial=step,
        desc="train",
        disable=not (main and config.progress),
        dynamic_ncols=True,
    )
    try:
        while step < config.steps:
            lr = set_lr(optimizer, step, config)
            for micro in range(config.grad_accum):
                ids = next(batches).to(device, non_blocking=True)
                sync = (
                    wrapped.no_sync()  # type: ignore[operator]
                    if world > 1 and micro < config.grad_accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    with autocast:
                        output = wrapped(input_ids=ids, labels=ids)
                        parts = {"lm_loss": output.loss.float()}
                        if is_cb:
                            assert isinstance(model, CodebookModel)
                            parts["codebook_loss"] = model.codebook_loss().float()
                            if config.kl_weight:
                                parts["kl"] = _kl_to_base(model, ids, output.logits)
                    loss = parts["lm_loss"] + parts.get("codebook_loss", 0.0)
                    if "kl" in parts:
                        loss = loss + config.kl_weight * parts["kl"]
                    (loss / config.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() / config.grad_accum  # type: ignore[assignment]
                window_tokens += ids.numel() * world
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
            step += 1
            tokens += ids.numel() * world * config.grad_accum
            bar.update(1)

            records: list[dict[str, Any]] = []
            if step % config.log_every == 0 or step == config.steps:
                now = time.perf_counter()
                n_steps = (
                    config.log_every if step % config.log_every == 0 else step % config.log_every
                )
                rec: dict[str, Any] = {"step": step, "lr": lr, "tokens": tokens}
                rec.update({k: float(v) / n_steps for k, v in sums.items()})
                rec["loss"] = rec["lm_loss"] + rec.get("codebook_loss", 0.0)
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                rec["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                sums, window_start, window_tokens = {}, now, 0
                result.train_loss = rec["lm_loss"]
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                records.append(rec)
            if (
                eval_batches is not None
                and main
                and ((config.eval_every and step % config.eval_every == 0) or step == config.steps)
            ):
                t0 = time.perf_counter()
                result.eval = evaluate(model, eval_batches, max_batches=config.eval_batches)
                model.train()
                records.append({"step": step, "eval": result.eval})
                window_start += time.perf_counter() - t0  # keep eval time out of tokens/s
            for rec in records:
                log.write(rec)
                result.history.append(rec)
                for cb in callbacks:
                    cb(step, rec)
            if (
                config.checkpoint_every and step % config.checkpoint_every == 0
            ) or step == config.steps:
                if main:
                    result.checkpoint = save_checkpoint(
                        out, model, optimizer, batches, config, step=step, tokens=tokens
                    )
                if world > 1:
                    import torch.distributed as dist

                    dist.barrier()
    finally:
        bar.close()
        log.close()
        model.train(was_training)
        for p in trainable_before:  # undo the freezing of "codebooks only" training
            p.requires_grad_(True)
    result.step, result.tokens = step, tokens
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- commands
# The `pretrain` and `train` CLI commands: validate every input before anything is written,
# train into OUT (checkpoints/, metrics.jsonl), then save the final model atomically to OUT/model.

ModelArch = Literal["gpt_neox", "llama", "gpt2"]
MODEL_DIR = "model"
RUN_CONFIG = "run_config.json"


@dataclass
class ModelConfig:
    """A small causal LM trained from scratch by ``codebook-lens pretrain``."""

    arch: ModelArch = "gpt_neox"
    """Architecture: 'gpt_neox', 'llama' or 'gpt2' (random init from a transformers config)."""

    num_layers: int = 2
    """Transformer blocks."""

    width: int = 128
    """Hidden size (d_model)."""

    heads: int = 4
    """Attention heads (width must divide by it)."""

    mlp_ratio: int = 4
    """MLP hidden size = width * mlp_ratio."""

    context: int = 512
    """Maximum sequence length (position embeddings)."""

    dropout: float = 0.0
    """Dropout probability in attention and MLP (where the architecture has it)."""

    tokenizer: str = "bpe:2048"
    """'bpe:N' (byte-level BPE trained on the training split), 'gpt2', or a folder / hub id."""

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ("gpt_neox", "llama", "gpt2"))
        for name in ("num_layers", "width", "heads", "mlp_ratio", "context"):
            _check_int(name, getattr(self, name), 1)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is invalid for heads={self.heads}: it must divide evenly"
            )


def build_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """A randomly initialised causal LM of ``cfg`` sized for ``tokenizer``'s vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    from .data import separator_id

    vocab = len(tokenizer)
    eos = separator_id(tokenizer)
    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}
    hf_cfg: Any
    if cfg.arch == "gpt2":
        hf_cfg = GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.width,
            n_head=cfg.heads,
            n_inner=cfg.width * cfg.mlp_ratio,
            n_positions=cfg.context,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    elif cfg.arch == "gpt_neox":
        hf_cfg = GPTNeoXConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.width,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.width * cfg.mlp_ratio,
            max_position_embeddings=cfg.context,
            attention_dropout=cfg.dropout,
            hidden_dropout=cfg.dropout,
            tie_word_embeddings=True,
            **common,
        )
    else:
        hf_cfg = LlamaConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.width,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.width * cfg.mlp_ratio,
            max_position_embeddings=cfg.context,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=True,
            **common,
        )
    return AutoModelForCausalLM.from_config(hf_cfg)


def load_run_config_file(path: str | None) -> dict[str, dict[str, Any]]:
    """Sections of a ``--config`` YAML/JSON file: ``{"codebook": {...}, "train": {...}, ...}``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    text = p.read_bytes()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text.decode("utf-8"))
        else:
            data = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
    allowed = ("codebook", "train", "data", "model")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {list(allowed)}")
    for key, value in data.items():
        if key not in allowed:
            raise ValueError(
                f"{path}: unknown section {key!r}; allowed sections are {list(allowed)}"
            )
        if not isinstance(value, dict):
            raise ValueError(f"{path}: section {key!r} must be a mapping of field: value")
    return data


def resolve_model_path(path: str) -> str:
    """A run folder (with ``model/``) -> its model folder; other paths and hub ids unchanged."""
    p = Path(path)
    if (
        p.is_dir()
        and not (p / "config.json").is_file()
        and (p / MODEL_DIR / "config.json").is_file()
    ):
        return str(p / MODEL_DIR)
    return path


def load_base_model(name: str) -> tuple[nn.Module, str]:
    """A causal LM (plain, or a saved codebook model) from a folder or hub id; clear errors."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return CodebookModel.from_pretrained(path), path
    looks_local = p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not p.is_dir():
        raise FileNotFoundError(f"--base {name}: no such model folder")
    try:
        return AutoModelForCausalLM.from_pretrained(path), path
    except Exception as e:  # offline hub, unknown name, missing files: one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"--base {name}: cannot load a causal LM ({msg}). Pass a folder saved by "
            "`codebook-lens pretrain` / save_pretrained, or a hub id when online"
        ) from None


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / RUN_CONFIG).is_file():
            raise FileNotFoundError(f"--out {out}: no {RUN_CONFIG} here, so nothing to resume")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out {out}: exists and is not empty; pass --resume to continue that run or "
            "choose a new directory"
        )


def _save_final(
    out: Path, model: nn.Module, tokenizer: Any, run_config: dict[str, Any], metrics: Any
) -> Path:
    """Save the final model + tokenizer + run config + eval to ``out/model`` in one swap."""
    final = out / MODEL_DIR
    tmp = out / f".{MODEL_DIR}.tmp-{os.getpid()}"
    old = out / f".{MODEL_DIR}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if isinstance(model, CodebookModel):
            model.save_pretrained(tmp, tokenizer=tokenizer)
        else:
            model.save_pretrained(tmp)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RUN_CONFIG, run_config)
        if metrics is not None:
            write_json_atomic(tmp / "eval.json", metrics)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    return final


def _prepare_blocks(
    train_docs: Sequence[Any], val_docs: Sequence[Any], tokenizer: Any, block_size: int
) -> tuple[Tensor, Tensor | None]:
    from .data import pack_tokens

    train_blocks = pack_tokens(train_docs, tokenizer, block_size)
    val_blocks = None
    if val_docs:
        try:
            val_blocks = pack_tokens(val_docs, tokenizer, block_size)
        except ValueError:
            raise ValueError(
                f"block_size={block_size} is invalid for the validation split: its "
                f"{len(val_docs)} documents give less than one block; raise val_fraction"
            ) from None
    return train_blocks, val_blocks


def _run(
    args: Any,
    *,
    command: str,
    build: Callable[[Any, Any, Any], tuple[nn.Module, dict[str, Any]]],
    classes: dict[str, type],
) -> int:
    """Shared body of ``pretrain`` and ``train``; ``build(configs, train_docs, device)`` returns
    the model and run-config extras (and the tokenizer under ``"_tokenizer"``)."""
    from transformers.utils import logging as hf_logging

    from .data import BatchStream, fixed_batches, load_documents, split_documents
    from .evaluate import evaluate, format_table

    hf_logging.disable_progress_bar()  # our own bars only; no "Loading weights" per load
    out = Path(args.out).expanduser()
    _check_out_dir(out, args.resume)
    saved: dict[str, Any] = read_json(out / RUN_CONFIG) if args.resume else {}
    sections = saved.get("configs") if args.resume else load_run_config_file(args.config)
    if not isinstance(sections, dict):
        raise ValueError(f"{out / RUN_CONFIG}: field 'configs' is missing")
    cfgs = configs_from_args(args, sections, classes)
    data_source = args.data or saved.get("data")
    if not data_source:
        raise ValueError("--data is required (a path, 'bbc', 'shakespeare' or hf:NAME)")
    tcfg: TrainConfig = cfgs["train"]
    dcfg = cfgs["data"]
    device = init_distributed(tcfg.device)
    rank, world = dist_info()

    docs = load_documents(data_source, limit=dcfg.limit)
    train_docs, val_docs = split_documents(docs, dcfg.val_fraction, dcfg.split_seed)
    seed_everything(tcfg.seed)
    model, extras = build(cfgs, train_docs, out if args.resume else None)
    tokenizer = extras.pop("_tokenizer")
    from .data import check_block_size

    base = model.base if isinstance(model, CodebookModel) else model
    check_block_size(dcfg.block_size, getattr(base, "config", None))
    train_blocks, val_blocks = _prepare_blocks(train_docs, val_docs, tokenizer, dcfg.block_size)
    stream = BatchStream(train_blocks, tcfg.batch_size, seed=tcfg.seed, rank=rank, world_size=world)
    eval_list = (
        fixed_batches(val_blocks, tcfg.batch_size, tcfg.eval_batches)
        if val_blocks is not None
        else None
    )
    model.to(device)
    run_config = {
        "command": command,
        "data": data_source,
        "configs": {k: dataclasses.asdict(v) for k, v in cfgs.items()},
        **extras,
    }
    # Every input is valid: from here on files are written.
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_CONFIG, run_config)
        for junk in out.glob(".tokenizer.tmp-*"):  # left by a run killed while saving it
            shutil.rmtree(junk, ignore_errors=True)
        if not (out / "tokenizer").exists():
            tmp = out / f".tokenizer.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            tmp.rename(out / "tokenizer")
    if rank == 0:
        print(
            f"{command}: {len(train_docs)} train / {len(val_docs)} validation documents, "
            f"{train_blocks.shape[0]} blocks of {dcfg.block_size} tokens; "
            f"{sum(p.numel() for p in model.parameters()):,} parameters",
            file=sys.stderr,
        )
    result = train(model, stream, tcfg, out, eval_batches=eval_list, resume=args.resume)
    if rank == 0:
        final_eval = (
            evaluate(model, fixed_batches(val_blocks, tcfg.batch_size))
            if val_blocks is not None
            else None
        )
        path = _save_final(out, model, tokenizer, run_config, final_eval)
        if final_eval is not None:
            print(format_table(final_eval))
        print(f"saved {path} ({result.step} steps, {result.tokens:,} tokens)", file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _tokenizer_for_run(spec: str, train_docs: Any, resume_dir: Path | None, output_dir: str) -> Any:
    """The run's tokenizer: the saved one on resume (a retrained BPE could differ), else
    ``load_tokenizer(spec)``. Under torchrun rank 0 builds it and the others load its copy."""
    from transformers import AutoTokenizer

    from .data import load_tokenizer

    if resume_dir is not None and (resume_dir / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(str(resume_dir / "tokenizer"))
    rank, world = dist_info()
    if world == 1 or not spec.startswith("bpe:"):
        return load_tokenizer(spec, train_docs)
    import torch.distributed as dist

    # Byte-level BPE training is not guaranteed identical across processes: share rank 0's,
    # beside the run folder (which every node must see anyway, to resume).
    out = Path(output_dir)
    shared = out.parent / f".{out.name}.tokenizer-{os.environ.get('MASTER_PORT', '0')}"
    if rank == 0:
        tok = load_tokenizer(spec, train_docs)
        tok.save_pretrained(shared)
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(str(shared)) if rank else tok
    dist.barrier()
    if rank == 0:
        shutil.rmtree(shared, ignore_errors=True)
    return tok


def run_pretrain(args: Any) -> int:
    """``codebook-lens pretrain``: train a small causal LM from scratch on a corpus."""
    from .data import DataConfig

    def build(cfgs: dict[str, Any], train_docs: Any, resume_dir: Any) -> Any:
        mcfg: ModelConfig = cfgs["model"]
        dcfg: DataConfig = cfgs["data"]
        if dcfg.block_size > mcfg.context:
            raise ValueError(
                f"block_size={dcfg.block_size} is invalid: the model's context is "
                f"{mcfg.context} tokens; use --block-size <= {mcfg.context} or raise --context"
            )
        tokenizer = _tokenizer_for_run(mcfg.tokenizer, train_docs, resume_dir, args.out)
        return build_model(mcfg, tokenizer), {"_tokenizer": tokenizer}

    return _run(
        args,
        command="pretrain",
        build=build,
        classes={"model": ModelConfig, "data": DataConfig, "train": TrainConfig},
    )


def run_train(args: Any) -> int:
    """``codebook-lens train``: attach codebooks to a base model and fine-tune on a corpus."""
    from transformers import AutoTokenizer

    from .data import DataConfig, load_tokenizer

    def build(cfgs: dict[str, Any], train_docs: Any, resume_dir: Any) -> Any:
        base_name = args.base or (
            read_json(resume_dir / RUN_CONFIG).get("base") if resume_dir else None
        )
        if not base_name:
            raise ValueError("--base is required (a model folder or a hub id)")
        base, path = load_base_model(base_name)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer, train_docs)
        elif resume_dir is not None and (resume_dir / "tokenizer").is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(resume_dir / "tokenizer"))
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception:
                raise FileNotFoundError(
                    f"--base {base_name}: has no tokenizer files; pass --tokenizer "
                    "(a folder, hub id, 'gpt2' or 'bpe:N')"
                ) from None
        vocab = getattr(getattr(base, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
                "use the tokenizer the model was trained with"
            )
        if isinstance(base, CodebookModel):
            model = base  # continue training a saved codebook model with its own config
        else:
            ccfg: CodebookConfig = dataclasses.replace(cfgs["codebook"], seed=cfgs["train"].seed)
            model = attach_codebooks(base, ccfg)
        return model, {"_tokenizer": tokenizer, "base": base_name}

    return _run(
        args,
        command="train",
        build=build,
        classes={"codebook": CodebookConfig, "data": DataConfig, "train": TrainConfig},
    )
