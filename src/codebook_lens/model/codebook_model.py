"""``attach_codebooks``: put codebooks into any Hugging Face causal LM with hooks; ``CodebookModel``
runs, saves and loads the result.

Where each codebook goes is decided in ``sites.py``; running the hooks in ``hooks.py``.
Checkpoints of other formats register a loader here (``register_format``), so
``CodebookModel.from_pretrained`` opens them too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from codebook_lens.config import read_json, replace_dir_atomic, write_json_atomic
from codebook_lens.model.config import CodebookConfig
from codebook_lens.model.hooks import CodeRecording, eval_mode, measure_widths
from codebook_lens.model.layer import CodebookLayer
from codebook_lens.model.sites import HookSite, find_blocks, resolve_sites

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CodeRecording",
    "CodebookModel",
    "ForeignFormat",
    "HookSite",
    "attach_codebooks",
    "eval_mode",
    "find_blocks",
    "load_safetensors",
    "register_format",
]

CONFIG_NAME = "codebook_config.json"
WEIGHTS_NAME = "codebooks.safetensors"
FORMAT_VERSION = 1


class CodebookModel(nn.Module):
    """A Hugging Face causal LM with codebooks hooked into it.

    ``model(input_ids=...)`` runs the base model with every codebook active; ``codebook_loss()``
    is the summed reconstruction loss of the last forward pass. ``codebooks`` maps names to
    ``CodebookLayer``s.
    """

    def __init__(self, base: nn.Module, config: CodebookConfig, sites: list[HookSite]) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.sites = sites
        device = next(base.parameters()).device
        layers = []
        for i, s in enumerate(sites):
            layer = CodebookLayer(
                s.dim,
                groups=s.groups,
                grouped=s.placement == "attn_heads",
                seed=config.seed + i,
                **config.layer_kwargs(),
            )
            layers.append(layer.to(device))
        self.codebook_layers = nn.ModuleList(layers)
        self.codebooks: dict[str, CodebookLayer] = {
            s.name: layer for s, layer in zip(sites, layers, strict=True)
        }
        self.enabled = True
        """When False the hooks pass activations through untouched (logits equal the base's)."""
        self._recording: CodeRecording | None = None
        self.origin: dict[str, Any] | None = None
        """Where a converted model came from (see ``reference.py``): saved in the manifest."""
        self._handles: list[RemovableHandle] = []
        self._attach_hooks()

    # --------------------------------------------------------------- hooks
    def _attach_hooks(self) -> None:
        modules = dict(self.base.named_modules())
        self._token_shapes: dict[int, tuple[int, int]] = {}
        flat_layers = sorted({s.layer for s in self.sites if s.flat and s.layer is not None})
        if flat_layers:
            _, blocks = find_blocks(self.base)
            for i in flat_layers:
                h = blocks[i].register_forward_pre_hook(self._shape_hook(i), with_kwargs=True)
                self._handles.append(h)
        for site, layer in zip(self.sites, self.codebook_layers, strict=True):
            mod = modules[site.module]
            assert isinstance(layer, CodebookLayer)
            if site.hook == "input":
                h = mod.register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True)
            else:
                h = mod.register_forward_hook(self._post_hook(site, layer))
            self._handles.append(h)

    def _shape_hook(self, i: int) -> Any:
        """Remember block ``i``'s ``(batch, seq)``, to unflatten its flattened sites."""

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, Tensor) and hidden.dim() >= 3:
                self._token_shapes[i] = (int(hidden.shape[0]), int(hidden.shape[1]))

        return hook

    def _quantize(self, site: HookSite, layer: CodebookLayer, x: Tensor) -> Tensor:
        shape = self._token_shapes.get(site.layer) if site.flat and site.layer is not None else None
        if shape is not None and x.dim() == 2 and x.shape[0] == shape[0] * shape[1]:
            result = layer(x.reshape(*shape, x.shape[-1]))
            out = result.output.reshape(x.shape)
        elif site.placement != "module" and x.dim() > 3:
            result = layer(x.flatten(2))  # (batch, seq, groups, w) -> (batch, seq, groups * w)
            out = result.output.reshape(x.shape)
        else:
            result = layer(x)
            out = result.output
        if self._recording is not None:
            self._recording.add(site.name, result.codes)
        return out

    def _pre_hook(self, site: HookSite, layer: CodebookLayer) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.enabled:
                return None
            if args:
                return (self._quantize(site, layer, args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: self._quantize(site, layer, kwargs[key])}

        return hook

    def _post_hook(self, site: HookSite, layer: CodebookLayer) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            if not self.enabled:
                return None
            if isinstance(out, Tensor):
                return self._quantize(site, layer, out)
            if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
                # (hidden, attention weights) / (hidden, router logits) / OpenAI-GPT's list /
                # Reformer's NamedTuple: same container, first item quantized.
                items = [self._quantize(site, layer, out[0]), *out[1:]]
                return out._make(items) if hasattr(out, "_make") else type(out)(items)
            raise TypeError(
                f"codebook {site.name}: cannot quantize the output of {site.module} "
                f"({type(out).__name__}); choose another placement or module"
            )

        return hook

    def detach(self) -> nn.Module:
        """Remove every hook and return the unmodified base model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return self.base

    # ------------------------------------------------------------- running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers`` generation with the codebooks active."""
        return self.base.generate(*args, **kwargs)  # type: ignore[operator]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[CodebookModel]:
        """Run the plain base model inside the block."""
        prev = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = prev

    @contextlib.contextmanager
    def record_codes(self) -> Iterator[CodeRecording]:
        """Record every codebook's code ids during the forward passes inside the block."""
        prev = self._recording
        rec = CodeRecording()
        self._recording = rec
        try:
            yield rec
        finally:
            self._recording = prev

    @torch.no_grad()
    def get_codes(self, input_ids: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        """Run one forward pass and return ``{name: codes}`` (``(batch, seq, [heads,] k)``)."""
        with self.record_codes() as rec:
            self(input_ids=input_ids, **kwargs)
        return rec.codes

    def codebook_loss(self) -> Tensor:
        """Sum of every codebook's reconstruction (+ commitment) loss in the last forward."""
        losses = [
            layer.last_loss for layer in self.codebooks.values() if layer.last_loss is not None
        ]
        if not losses:
            return torch.zeros((), device=next(self.parameters()).device)
        return torch.stack(losses).sum()

    def step(self) -> None:
        """After each optimizer step: advance dead-code clocks and revive dead codes."""
        for layer in self.codebooks.values():
            layer.step()

    def reset_stats(self) -> None:
        for layer in self.codebooks.values():
            layer.reset_stats()

    def codebook_parameters(self) -> list[nn.Parameter]:
        """Each codebook's code vectors, and its input LayerNorm's weight and bias if affine."""
        return [
            p
            for layer in self.codebooks.values()
            for p in (layer.codebook, layer.ln_weight, layer.ln_bias)
            if p is not None
        ]

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.base.parameters())

    # ---------------------------------------------------------------- save
    def codebook_state(self) -> dict[str, Tensor]:
        """Every codebook's weights and statistics as ``{"{name}.{key}": tensor}``."""
        state: dict[str, Tensor] = {}
        for name, layer in self.codebooks.items():
            for key, t in layer.state_dict().items():
                state[f"{name}.{key}"] = t.detach().cpu().contiguous()
        return state

    def load_codebook_state(self, state: dict[str, Tensor], *, source: str = "state") -> None:
        """Inverse of ``codebook_state``; names every missing or mismatched tensor."""
        for name, layer in self.codebooks.items():
            own = layer.state_dict()
            sub = {}
            for key, t in own.items():
                full = f"{name}.{key}"
                if full not in state:
                    raise ValueError(f"{source}: tensor {full!r} is missing")
                if state[full].shape != t.shape:
                    raise ValueError(
                        f"{source}: tensor {full!r} has shape {tuple(state[full].shape)}, "
                        f"expected {tuple(t.shape)}"
                    )
                sub[key] = state[full]
            layer.load_state_dict(sub)

    def manifest(self) -> dict[str, Any]:
        base_cfg = getattr(self.base, "config", None)
        return {
            "format": "codebook-lens",
            "version": FORMAT_VERSION,
            "base_model": getattr(base_cfg, "_name_or_path", "") or "",
            "model_type": getattr(base_cfg, "model_type", "") or "",
            "config": self.config.to_dict(),
            "codebooks": [asdict(s) for s in self.sites],
            **({"origin": self.origin} if self.origin is not None else {}),
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], tokenizer: Any = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (the base model, loadable by
        transformers alone), ``codebook_config.json`` and ``codebooks.safetensors``.

        Files are written to a temporary folder first and renamed into place, so a failed save
        leaves nothing (and an existing model there stays intact until the swap).
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        with replace_dir_atomic(out) as tmp:
            with self.disabled():
                self.base.save_pretrained(tmp)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_file(self.codebook_state(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            write_json_atomic(tmp / CONFIG_NAME, self.manifest())
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
        base: str | os.PathLike[str] | None = None,
        **hf_kwargs: Any,
    ) -> CodebookModel:
        """Load a model saved by ``save_pretrained`` from a folder or a hub repository id.

        A checkpoint of the paper's reference code (``config.json`` with ``model_type:
        "codebook"``) is converted in memory; ``base`` then names a folder or hub id whose
        ``config.json`` describes its base model (see ``reference.load_reference``).
        """
        from transformers import AutoModelForCausalLM

        for fmt in foreign_formats():
            if fmt.detect(path, local_files_only=local_files_only):
                return fmt.load(path, base, device=device, local_files_only=local_files_only)
        if base is not None:
            raise ValueError(
                f"{path}: base={base!r} is only for checkpoints of the reference code; a "
                "codebook-lens model folder holds its own base model"
            )
        cfg_file, weights_file = _resolve_files(str(path), local_files_only=local_files_only)
        manifest = read_json(cfg_file)
        if not isinstance(manifest, dict) or manifest.get("format") != "codebook-lens":
            raise ValueError(f"{cfg_file}: not a codebook-lens config (field 'format' missing)")
        if "config" not in manifest or "codebooks" not in manifest:
            raise ValueError(f"{cfg_file}: missing field 'config' or 'codebooks'")
        config = CodebookConfig.from_dict(manifest["config"], source=f"{cfg_file}: config")
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=local_files_only, **hf_kwargs
        )
        if device is not None:
            hf_model = hf_model.to(device)  # type: ignore[arg-type]
        model = attach_codebooks(hf_model, config)
        saved = [s.get("name") for s in manifest["codebooks"] if isinstance(s, dict)]
        if saved != list(model.codebooks):
            raise ValueError(
                f"{cfg_file}: field 'codebooks' lists {saved}, but the config resolves to "
                f"{list(model.codebooks)} on this model"
            )
        model.load_codebook_state(load_safetensors(weights_file), source=weights_file)
        origin = manifest.get("origin")
        model.origin = origin if isinstance(origin, dict) else None
        return model


class ForeignFormat(NamedTuple):
    """A checkpoint format other than ours that ``CodebookModel.from_pretrained`` opens.

    Formats register themselves from modules above this one (``reference.py`` for the paper's
    own code), so loading stays one verb while this module imports nothing above it.
    """

    name: str
    detect: Callable[..., bool]
    """``detect(path, local_files_only=...)``: whether ``path`` holds this format."""
    load: Callable[..., CodebookModel]
    """``load(path, base, device=..., local_files_only=...)``: the converted model."""


_FOREIGN_FORMATS: list[ForeignFormat] = []

FORMAT_MODULES = ("codebook_lens.model.reference",)
"""Modules that register a format when imported; ``from_pretrained`` imports them on first use,
so no import of the package has to happen for its side effect."""


def foreign_formats() -> list[ForeignFormat]:
    """Every registered format, after importing the modules of ``FORMAT_MODULES``."""
    for name in FORMAT_MODULES:
        importlib.import_module(name)
    return list(_FOREIGN_FORMATS)


def register_format(fmt: ForeignFormat) -> None:
    """Let ``from_pretrained`` open ``fmt`` (re-registering a name replaces it)."""
    _FOREIGN_FORMATS[:] = [f for f in _FOREIGN_FORMATS if f.name != fmt.name] + [fmt]


def _resolve_files(path: str, *, local_files_only: bool) -> tuple[str, str]:
    p = Path(path)
    if p.is_dir():
        cfg, weights = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not cfg.is_file():
            raise FileNotFoundError(
                f"{p}: no {CONFIG_NAME} in this directory, so it is not a saved codebook model. "
                "To add codebooks to a plain model use attach_codebooks(model, CodebookConfig(...))"
            )
        if not weights.is_file():
            raise FileNotFoundError(f"{p}: {WEIGHTS_NAME} is missing")
        return str(cfg), str(weights)
    if p.exists() or path.startswith((".", "/")) or path.count("/") > 1:
        raise FileNotFoundError(f"{path}: not a directory with a saved codebook model")
    from huggingface_hub import hf_hub_download

    try:
        cfg_s = hf_hub_download(path, CONFIG_NAME, local_files_only=local_files_only)
        w_s = hf_hub_download(path, WEIGHTS_NAME, local_files_only=local_files_only)
    except Exception as e:  # network or missing repo: one clear message
        raise FileNotFoundError(
            f"{path}: cannot fetch {CONFIG_NAME}/{WEIGHTS_NAME} from the hub ({type(e).__name__}: "
            f"{e}). Pass a local directory, or check the repository id and your connection."
        ) from None
    return cfg_s, w_s


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a safetensors file; a truncated or corrupted file raises ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: corrupted or truncated safetensors file ({e})") from None


def attach_codebooks(model: nn.Module, config: CodebookConfig | None = None) -> CodebookModel:
    """Hook codebooks into ``model`` (a Hugging Face causal LM) as ``config`` says.

    The base model's weights are shared, not copied. ``CodebookModel.detach()`` undoes it.
    """
    if isinstance(model, CodebookModel):
        raise TypeError("this model already has codebooks; detach() them first")
    config = CodebookConfig() if config is None else config
    sites = resolve_sites(model, config)
    measure_widths(model, sites)
    return CodebookModel(model, config, sites)
