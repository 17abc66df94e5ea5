"""Checkpoints and exact resume: everything a training run needs to continue, with no pickle.

``save_checkpoint`` writes ``out_dir/checkpoints/step-NNNNNNNN/``:

- ``weights.safetensors``: the whole model's state (base weights, codebooks and their buffers);
- ``config.json`` + ``codebook_config.json``: enough to rebuild the model (``load_checkpoint_model``);
- ``optimizer.safetensors`` + ``optimizer.json``: optimizer state, tensors and structure apart;
- ``rng.safetensors`` + ``trainer_state.json``: RNG states, step, data position, train config.

A checkpoint is assembled in a hidden temporary folder, fsynced and renamed into place; older
ones are deleted only afterwards, so a crash at any moment leaves the last good checkpoint
intact. ``load_checkpoint`` restores weights, optimizer, data position and every RNG, so a run
resumed from it continues exactly as if it had never stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from codebook_lens.config import read_json, write_json_atomic
from codebook_lens.model.codebook_model import (
    CONFIG_NAME,
    CodebookModel,
    attach_codebooks,
    load_safetensors,
)
from codebook_lens.model.config import CodebookConfig

CHECKPOINT_FORMAT = 1


class Stateful(Protocol):
    """What a checkpoint saves of the data: a JSON-ready position and a way back to it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    batches: Stateful,
    *,
    step: int,
    tokens: int,
    train_config: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write ``out_dir/checkpoints/step-{step:08d}`` atomically; keep the newest ``keep``.

    ``train_config`` (JSON-ready) is stored in ``trainer_state.json`` beside the step.
    """
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
                "train_config": train_config,
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
    for stale in list_checkpoints(out_dir)[:-keep]:
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
    batches: Stateful | None = None,
) -> dict[str, Any]:
    """Restore weights (and optimizer, data position, RNG) from a checkpoint folder.

    Returns the ``trainer_state.json`` object. Errors name the file at fault.
    """
    from safetensors.torch import load_model

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
    load_safetensors(path / "weights.safetensors")
    try:
        load_model(model, str(path / "weights.safetensors"), device=device or "cpu")
    except RuntimeError as e:
        raise ValueError(
            f"{path / 'weights.safetensors'}: does not fit the saved config ({e})"
        ) from None
    _load_host_state(model, read_json(path / "trainer_state.json").get("host_state", {}))
    return model
