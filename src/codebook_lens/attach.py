"""Put codebooks into any Hugging Face causal LM with hooks, and save / load the result.

Placements are resolved from the model's own modules (never by copying model code):

- ``attn_heads``: forward pre-hook on the attention output projection (``c_proj``, ``dense``,
  ``o_proj``, ...): the concatenated head outputs ``(batch, seq, heads * head_dim)`` are quantized
  by one grouped codebook per head.
- ``attn_out``: output of the attention module; ``mlp_out``: output of the MLP module;
  ``residual``: output of the block.
- ``modules``: fnmatch globs over ``model.named_modules()``; each match's output is quantized.

Codebooks are named ``layers.{i}.{placement}`` (glob matches keep their module path).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import CodebookConfig, read_json, write_json_atomic
from .layer import CodebookLayer

CONFIG_NAME = "codebook_config.json"
WEIGHTS_NAME = "codebooks.safetensors"
FORMAT_VERSION = 1

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo", "proj")


@dataclass
class HookSite:
    """Where one codebook sits in the base model."""

    name: str
    """Readable codebook name, e.g. ``layers.3.attn_heads``."""
    module: str
    """Path of the hooked module in ``model.named_modules()``."""
    hook: Literal["input", "output"]
    """Quantize the module's first input (pre-hook) or its output (forward hook)."""
    placement: str
    """'attn_heads', 'attn_out', 'mlp_out', 'residual' or 'module'."""
    layer: int | None
    """Block index, or ``None`` for glob matches outside the block list."""
    dim: int = 0
    """Activation width."""
    groups: int = 1
    """Codebooks in the group (heads for ``attn_heads``)."""


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every module gets its own mode back.

    One flag is not enough: a wrapper in train mode may hold a frozen base in eval mode.
    """
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for mod, mode in modes:
            mod.training = mode


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the longest ``ModuleList`` of same-typed modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            types = {type(m) for m in mod}
            if len(types) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: found no list of transformer blocks (an nn.ModuleList); "
            "use CodebookConfig(modules=[...globs...]) to name modules explicitly"
        )
    return best


def _child(block: nn.Module, names: tuple[str, ...], cls_hint: str) -> tuple[str, nn.Module]:
    children = dict(block.named_children())
    for n in names:
        if n in children:
            return n, children[n]
    for n, m in children.items():
        if cls_hint.lower() in type(m).__name__.lower():
            return n, m
    raise ValueError(
        f"{type(block).__name__}: no {cls_hint} submodule among {sorted(children)}; "
        "use CodebookConfig(modules=[...globs...]) to name it explicitly"
    )


def _out_proj(attn: nn.Module) -> tuple[str, nn.Module]:
    children = dict(attn.named_children())
    for n in _OUT_PROJ_NAMES:
        if n in children:
            return n, children[n]
    raise ValueError(
        f"{type(attn).__name__}: cannot find the attention output projection among "
        f"{sorted(children)} (looked for {list(_OUT_PROJ_NAMES)})"
    )


def _num_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError("cannot read the number of attention heads from model.config")


def resolve_sites(model: nn.Module, config: CodebookConfig) -> list[HookSite]:
    """Turn the config's placements, layers and globs into concrete hook sites."""
    sites: list[HookSite] = []
    if config.placements:
        prefix, blocks = find_blocks(model)
        n = len(blocks)
        if config.layers == "all":
            layers = list(range(n))
        else:
            layers = []
            for i in config.layers:
                if not -n <= i < n:
                    raise ValueError(
                        f"layers={config.layers!r} is invalid: index {i} is out of range for a "
                        f"model with {n} blocks (allowed: {-n} .. {n - 1})"
                    )
                layers.append(i % n)
            layers = sorted(set(layers))
        for i in layers:
            block = blocks[i]
            bpath = f"{prefix}.{i}"
            for p in config.placements:
                if p == "residual":
                    sites.append(HookSite(f"layers.{i}.residual", bpath, "output", p, i))
                elif p == "mlp_out":
                    mname, _ = _child(block, _MLP_NAMES, "mlp")
                    sites.append(
                        HookSite(f"layers.{i}.mlp_out", f"{bpath}.{mname}", "output", p, i)
                    )
                elif p == "attn_out":
                    aname, _ = _child(block, _ATTN_NAMES, "attention")
                    sites.append(
                        HookSite(f"layers.{i}.attn_out", f"{bpath}.{aname}", "output", p, i)
                    )
                elif p == "attn_heads":
                    aname, attn = _child(block, _ATTN_NAMES, "attention")
                    oname, _ = _out_proj(attn)
                    sites.append(
                        HookSite(
                            f"layers.{i}.attn_heads",
                            f"{bpath}.{aname}.{oname}",
                            "input",
                            p,
                            i,
                            groups=_num_heads(model),
                        )
                    )
    names = [n for n, _ in model.named_modules() if n]
    for pattern in config.modules:
        matched = sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)
        if not matched:
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            hint = f" Nearby module names: {near}" if near else f" Some module names: {names[:8]}"
            raise ValueError(f"modules: the glob {pattern!r} matches no module of the model.{hint}")
        for m in matched:
            sites.append(HookSite(m, m, "output", "module", None))
    seen: set[str] = set()
    for s in sites:
        if s.name in seen:
            raise ValueError(f"codebook {s.name!r} is placed twice; remove the duplicate")
        seen.add(s.name)
    return sites


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find an activation tensor in a {type(value).__name__}")


@torch.no_grad()
def _measure_widths(model: nn.Module, sites: list[HookSite]) -> None:
    """One dummy forward pass to read every site's activation width."""
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []

    def record(site: HookSite) -> Any:
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any = None) -> None:
            t = _first_tensor(args if site.hook == "input" else out)
            site.dim = int(t.shape[-1])

        return hook

    try:
        for s in sites:
            mod = modules[s.module]
            if s.hook == "input":
                handles.append(mod.register_forward_pre_hook(record(s), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(record(s), with_kwargs=True))
        device = next(model.parameters()).device
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        if s.dim <= 0:
            raise ValueError(f"codebook {s.name}: module {s.module} did not run in a forward pass")
        if s.dim % s.groups:
            raise ValueError(
                f"codebook {s.name}: width {s.dim} does not divide into {s.groups} heads"
            )


class CodeRecording:
    """Code ids recorded by ``CodebookModel.record_codes()``, by codebook name.

    Several forward passes (e.g. generation with a KV cache) are joined along the sequence axis.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}

    def add(self, name: str, codes: Tensor) -> None:
        self._parts.setdefault(name, []).append(codes.detach())

    @property
    def codes(self) -> dict[str, Tensor]:
        """``name -> (batch, seq, [heads,] k)`` int64 code ids."""
        return {n: p[0] if len(p) == 1 else torch.cat(p, dim=1) for n, p in self._parts.items()}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._parts:
            raise KeyError(f"no codes recorded for {name!r}; recorded: {sorted(self._parts)}")
        return self.codes[name]

    def keys(self) -> list[str]:
        return list(self._parts)


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
        for site, layer in zip(self.sites, self.codebook_layers, strict=True):
            mod = modules[site.module]
            assert isinstance(layer, CodebookLayer)
            if site.hook == "input":
                h = mod.register_forward_pre_hook(self._pre_hook(site, layer), with_kwargs=True)
            else:
                h = mod.register_forward_hook(self._post_hook(site, layer))
            self._handles.append(h)

    def _quantize(self, site: HookSite, layer: CodebookLayer, x: Tensor) -> Tensor:
        result = layer(x)
        if self._recording is not None:
            self._recording.add(site.name, result.codes)
        return result.output

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
            if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
                return (self._quantize(site, layer, out[0]), *out[1:])
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
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with self.disabled():
                self.base.save_pretrained(tmp)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_file(self.codebook_state(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            write_json_atomic(tmp / CONFIG_NAME, self.manifest())
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not out.exists():
                old.rename(out)
            raise
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

        from . import reference

        if reference.is_reference_checkpoint(path, local_files_only=local_files_only):
            return reference.load_reference(
                path, base, device=device, local_files_only=local_files_only
            )
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
    _measure_widths(model, sites)
    return CodebookModel(model, config, sites)
