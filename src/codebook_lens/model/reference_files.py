"""The files of a checkpoint of the paper's own code: finding them (folder or hub) and reading
its weights (safetensors, or a ``.bin`` pickle read with ``weights_only=True``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from codebook_lens.config import read_json
from codebook_lens.model.codebook_model import CONFIG_NAME, load_safetensors

REFERENCE_MODEL_TYPE = "codebook"
SAFE_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is no local path."""
    return not Path(path).exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def _hub_file(repo: str, name: str, *, local_files_only: bool) -> Path | None:
    """Download ``name`` from hub repo ``repo``; ``None`` if the repository lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, name, local_files_only=local_files_only))
    except EntryNotFoundError:
        return None
    except Exception as e:  # offline, no such repository, no permission: one clear message
        raise FileNotFoundError(
            f"{repo}: cannot fetch {name} from the hub ({type(e).__name__}: {e}). Pass a local "
            "folder, or check the repository id and your connection."
        ) from None


def is_reference_checkpoint(
    path: str | os.PathLike[str], *, local_files_only: bool = False
) -> bool:
    """True if ``path`` (folder or hub id) has a ``config.json`` with ``model_type: "codebook"``."""
    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file() or not (p / "config.json").is_file():
            return False
        cfg_file: Path | None = p / "config.json"
    elif is_hub_id(str(path)):
        try:
            cfg_file = _hub_file(str(path), "config.json", local_files_only=local_files_only)
        except FileNotFoundError:
            return False
    else:
        return False
    try:
        with open(cfg_file, encoding="utf-8") as f:  # type: ignore[arg-type]
            data = json.load(f)
    except (OSError, ValueError, TypeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == REFERENCE_MODEL_TYPE


def reference_files(
    path: str | os.PathLike[str], *, local_files_only: bool = False
) -> tuple[Path, list[Path]]:
    """``config.json`` and the weight files (one, or the shards of an index) of a checkpoint.

    ``model.safetensors`` is preferred over ``pytorch_model.bin`` when both exist.
    """
    src = str(path)
    p = Path(src).expanduser()
    names = [
        SAFE_WEIGHTS,
        SAFE_WEIGHTS + ".index.json",
        PICKLE_WEIGHTS,
        PICKLE_WEIGHTS + ".index.json",
    ]
    if p.is_dir():
        cfg = p / "config.json"
        if (p / CONFIG_NAME).is_file():
            raise ValueError(
                f"{p}: this is already a codebook-lens model ({CONFIG_NAME}); load it with "
                "CodebookModel.from_pretrained(folder) or pass it to any command, no conversion needed"
            )
        if not cfg.is_file():
            raise FileNotFoundError(f"{p}: no config.json in this folder, so it is no checkpoint")

        def find(name: str) -> Path | None:
            return p / name if (p / name).is_file() else None

    elif is_hub_id(src):
        got = _hub_file(src, "config.json", local_files_only=local_files_only)
        if got is None:
            raise FileNotFoundError(f"{src}: the hub repository has no config.json")
        cfg = got

        def find(name: str) -> Path | None:
            return _hub_file(src, name, local_files_only=local_files_only)

    else:
        raise FileNotFoundError(
            f"{src}: no such folder (pass a checkpoint folder or a hub id like "
            "taufeeque/TokFSM_k1_codebook_model)"
        )
    for name in names:
        found = find(name)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return cfg, [found]
        index = read_json(found)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{found}: no 'weight_map' in this index file; it is corrupted")
        shards = []
        for shard in sorted(set(map(str, weight_map.values()))):
            if Path(shard).name != shard:
                raise ValueError(f"{found}: shard name {shard!r} is not a plain file name")
            got_shard = find(shard)
            if got_shard is None:
                raise FileNotFoundError(f"{found}: lists shard {shard}, which is missing")
            shards.append(got_shard)
        return cfg, shards
    raise FileNotFoundError(
        f"{src}: neither {SAFE_WEIGHTS} nor {PICKLE_WEIGHTS} is there; the checkpoint's weights "
        "are missing"
    )


def read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``model.safetensors`` or, safely, from ``pytorch_model.bin``.

    The pickle is read with ``weights_only=True``: only tensors and plain containers load, and
    anything else (code to run) is refused. Errors name the file.
    """
    if path.name.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except Exception as e:  # truncated zip, bad pickle, refused global: one clear message
        raise ValueError(
            f"{path}: cannot read it as a weights-only PyTorch checkpoint; it is corrupted, "
            f"truncated or holds more than tensors ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state
