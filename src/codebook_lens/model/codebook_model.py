"""Put codebooks into any Hugging Face causal LM with hooks, and save / load the result.

Placements are resolved from the model's own modules (never by copying model code), by
structure first and names second, so nested attention modules (``attn.attention.out_proj``),
fused QKV projections, MoE blocks, multi-query / grouped-query attention and MLPs that are
bare linears on the layer (OPT's ``fc1`` / ``fc2``) all resolve:

- ``attn_heads``: forward pre-hook on the attention output projection (``o_proj``, ``c_proj``,
  ``dense``, ``out_proj``, ...; found anywhere inside the attention module): the concatenated
  head outputs ``(batch, seq, num_heads * head_dim)`` are quantized by one grouped codebook per
  query head. With GQA / MQA that width can differ from the hidden size.
- ``attn_out``: output of the attention module; ``mlp_out``: output of the MLP (or MoE) module,
  or of the MLP's last linear where the layer has no MLP submodule; ``residual``: output of the
  block.
- ``modules``: fnmatch globs over ``model.named_modules()``; each match's output is quantized.

On hybrid models a named placement goes on every block that has the component (e.g. only the
attention layers of a Mamba/attention hybrid); a model with no attention at all (Mamba, RWKV)
raises a ``ValueError`` that says which placements work instead.
Codebooks are named ``layers.{i}.{placement}`` (glob matches keep their module path).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from codebook_lens.config import read_json, write_json_atomic
from codebook_lens.model.config import PLACEMENTS, CodebookConfig
from codebook_lens.model.layer import CodebookLayer

CONFIG_NAME = "codebook_config.json"
WEIGHTS_NAME = "codebooks.safetensors"
FORMAT_VERSION = 1

# Names are hints tried before structure; order matters (first match wins).
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "moe", "mixer")
_OUT_PROJ_NAMES = (
    "o_proj", "c_proj", "dense", "out_proj", "wo", "Wo", "out_lin", "o_a_proj", "attention_out",
    "proj",
)  # fmt: skip
# Query / key / fused-QKV projections: a module holding (query and key) or a fused QKV
# projection computes attention scores, whatever its class is called.
_QUERY_NAMES = frozenset(
    {"q_proj", "query", "q", "wq", "Wq", "q_lin", "q_a_proj", "query_proj", "q_attn", "project_q"}
)
_KEY_NAMES = frozenset(
    {
        "k_proj",
        "key",
        "k",
        "wk",
        "Wk",
        "k_lin",
        "kv_proj",
        "kv_a_proj_with_mqa",
        "key_proj",
        "project_k",
    }
)
_VALUE_NAMES = frozenset(
    {"v_proj", "value", "v", "wv", "Wv", "v_lin", "value_proj", "kv_b_proj", "project_v"}
)
_FUSED_QKV_NAMES = frozenset({"c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "qkv"})
# Token mixers that are not softmax attention (state-space, recurrent, linear attention,
# convolution): matched against a module's class name and its attribute name, lower-cased.
# Model families whose name says the mixer is no attention (anywhere in the class name) ...
_MIXER_FAMILIES = ("mamba", "rwkv", "rglru", "shortconv", "ssm", "lstm")
# ... and words that say so once the model's own prefix is gone ('KimiLinearAttention' is MLA
# softmax attention, 'KimiLinearDeltaAttention' is not; 'RecurrentGemmaSdpaAttention' is).
_MIXER_WORDS = ("mixer", "recurrent", "delta", "linearattention", "lightning", "retention")
_MIXER_NAMES = ("linear_attn", "mamba", "mamba_decoder")
_MLP_CLASS_HINTS = ("mlp", "feedforward", "moe", "experts", "ffn")
_CROSS_ATTENTION = ("cross", "encoder_attn", "encoderattention")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_q_heads")
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PROBE_SHAPE = (2, 3)  # (batch, seq) of the dummy forward pass that measures widths


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
    flat: bool = False
    """The module sees tokens flattened to ``(batch * seq, width)`` (OPT's MLP); the hook
    quantizes them as ``(batch, seq, width)`` (shape read at the block's input), so codes keep
    their documented shapes."""


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


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        with contextlib.suppress(Exception):
            cfg = cfg.get_text_config()
    return cfg


def architecture_name(model: nn.Module) -> str:
    """``"GPTNeoForCausalLM (model_type 'gpt_neo')"``: how errors name a model."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {mt!r})" if mt else type(model).__name__


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: ``(path, ModuleList)``.

    With a layer count in ``model.config``: the shallowest ``ModuleList`` of that length (its
    blocks may differ in type, as in hybrid attention / state-space models). Without one: the
    longest ``ModuleList`` of same-typed modules.
    """
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]
    cfg = _text_config(model)
    counts = {getattr(cfg, a, None) for a in _LAYER_COUNT_ATTRS}
    sized = [(name, mod) for name, mod in lists if len(mod) in counts]
    if sized:
        return min(sized, key=lambda item: item[0].count("."))
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in lists:
        if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ValueError(
            f"{architecture_name(model)}: found no list of transformer blocks (an "
            "nn.ModuleList); use CodebookConfig(modules=[...globs...]) to name modules explicitly"
        )
    return best


def _is_linear(mod: nn.Module) -> bool:
    """A projection: a module with its own 2-D ``weight`` (Linear, GPT-2's Conv1D, BitLinear...)."""
    w = getattr(mod, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 2 and not isinstance(mod, nn.Embedding | nn.Conv1d)


def _is_norm(mod: nn.Module) -> bool:
    """A LayerNorm / RMSNorm / ... leaf (DBRX's 'NormAttentionNorm' wrapper is not one)."""
    if isinstance(mod, nn.LayerNorm | nn.GroupNorm):
        return True
    return not list(mod.children()) and bool(
        re.search(r"norm(gated)?$", type(mod).__name__.lower())
    )


def _own_words(mod: nn.Module, parent: nn.Module | None) -> str:
    """``mod``'s class name, lower-cased, without the prefix it shares with ``parent``'s
    (the model's name: 'KimiLinear', 'RecurrentGemma')."""
    cls = type(mod).__name__
    if parent is not None:
        cls = cls[len(os.path.commonprefix([cls, type(parent).__name__])) :]
    return cls.lower()


def _is_mixer(name: str, mod: nn.Module, parent: nn.Module | None = None) -> bool:
    """A token mixer that is not softmax attention (Mamba, RWKV, linear attention, ...)."""
    cls = type(mod).__name__.lower()
    if _is_norm(mod) or any(h in cls for h in _MLP_CLASS_HINTS):
        return False
    return (
        any(w in cls for w in _MIXER_FAMILIES)
        or any(w in _own_words(mod, parent) for w in _MIXER_WORDS)
        or name in _MIXER_NAMES
    )


def _is_attention(name: str, mod: nn.Module, parent: nn.Module | None = None) -> bool:
    """Softmax self-attention: holds query + key (or fused QKV) projections, or says so."""
    cls = type(mod).__name__.lower()
    if (
        _is_linear(mod)
        or _is_norm(mod)
        or _is_mixer(name, mod, parent)
        or any(c in f"{name} {cls}".lower() for c in _CROSS_ATTENTION)
    ):
        return False
    if _holds_qk(mod):
        return True
    return "attention" in cls or "attn" in cls


def _is_mlp(name: str, mod: nn.Module, parent: nn.Module | None = None) -> bool:
    """An MLP / MoE block: says so in its class name (RWKV's channel mix too), or is named
    like one and is no token mixer."""
    cls = type(mod).__name__.lower()
    if _is_linear(mod) or _is_norm(mod) or _is_attention(name, mod, parent):
        return False
    if any(h in cls for h in _MLP_CLASS_HINTS):
        return True
    return name in _MLP_NAMES and not _is_mixer(name, mod, parent)


def _child(block: nn.Module, names: tuple[str, ...], cls_hint: str) -> tuple[str, nn.Module]:
    """The block's attention (``cls_hint`` 'attention') or MLP ('mlp') submodule.

    Names in ``names`` are tried first, then any child whose structure says so (see
    ``_is_attention`` / ``_is_mlp``). ``ValueError`` if there is none.
    """
    test = _is_attention if "att" in cls_hint.lower() else _is_mlp
    children = list(block.named_children())
    by_name = dict(children)
    for n in names:
        if n in by_name and test(n, by_name[n], block):
            return n, by_name[n]
    for n, m in children:
        if test(n, m, block):
            return n, m
    raise ValueError(
        f"{type(block).__name__}: no {cls_hint} submodule among {sorted(by_name)}; "
        "use CodebookConfig(modules=[...globs...]) to name it explicitly"
    )


def _bfs(root: nn.Module, max_depth: int = 3) -> Iterator[tuple[str, nn.Module]]:
    """``(relative path, module)`` breadth first, shallow modules before deep ones."""
    frontier: list[tuple[str, nn.Module]] = [("", root)]
    for _ in range(max_depth):
        nxt: list[tuple[str, nn.Module]] = []
        for path, mod in frontier:
            for n, child in mod.named_children():
                p = f"{path}.{n}" if path else n
                yield p, child
                nxt.append((p, child))
        frontier = nxt


def _out_proj(attn: nn.Module) -> tuple[str, nn.Module]:
    """The attention output projection: ``(path relative to attn, module)``.

    By name at any depth (GPT-Neo nests it: ``attention.out_proj``; BERT: ``output.dense``),
    else the last-registered projection among its children that is not a query / key / value
    projection or a gate / router (those read the hidden state, not the heads).
    """
    found = list(_bfs(attn))
    for want in _OUT_PROJ_NAMES:
        for path, mod in found:
            if path.rsplit(".", 1)[-1] == want and not _is_cross(path):
                return path, mod
    qkv = _QUERY_NAMES | _KEY_NAMES | _VALUE_NAMES | _FUSED_QKV_NAMES
    rest = [
        (n, m)
        for n, m in attn.named_children()
        if _is_linear(m)
        and n not in qkv
        and not _is_cross(n)
        and not any(w in n.lower() for w in ("gate", "router"))
    ]
    if rest:
        return rest[-1]
    raise ValueError(
        f"{type(attn).__name__} has no attention output projection that reads the concatenated "
        f"heads (looked for {list(_OUT_PROJ_NAMES)}, then for a projection among its children "
        f"{sorted(n for n, _ in attn.named_children())} that is not a query/key/value, gate or "
        "router one)"
    )


def _is_cross(path: str) -> bool:
    return any(c in path.lower() for c in _CROSS_ATTENTION)


def _num_heads(model: nn.Module, attn: nn.Module | None = None) -> int:
    """Query heads of ``attn`` (its own attributes first, for per-layer head counts), else of
    ``model.config``."""
    if attn is not None:
        for _, mod in [("", attn), *_bfs(attn, max_depth=2)]:
            for attr in _HEAD_ATTRS:
                v = getattr(mod, attr, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    cfg = _text_config(model)
    for attr in _HEAD_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    raise ValueError(
        f"{architecture_name(model)}: cannot read the number of attention heads from the "
        f"attention module or model.config (looked for {list(_HEAD_ATTRS)})"
    )


@dataclass
class _BlockParts:
    """What one block offers each named placement: ``(module path relative to the block,
    hook kind)``, or why not."""

    attn: str | None = None
    heads_site: str | None = None
    heads: int = 0
    mlp: tuple[str, Literal["input", "output"]] | None = None
    why_no_attn: str = ""
    why_no_heads: str = ""
    why_no_mlp: str = ""


def _nested_block(block: nn.Module) -> tuple[str, nn.Module] | None:
    """A whole attention + MLP sub-block inside a block (Zamba's hybrid layers wrap one)."""
    for n, m in block.named_children():
        kids = dict(m.named_children())
        if kids.keys() & (_QUERY_NAMES | _KEY_NAMES | _FUSED_QKV_NAMES):
            continue  # an attention module, not a block
        if any(_is_attention(k, c, m) for k, c in kids.items()) and any(
            _is_mlp(k, c, m) for k, c in kids.items()
        ):
            return n, m
    return None


def _holds_qk(mod: nn.Module) -> bool:
    kids = {n for n, _ in mod.named_children()}
    return bool(kids & _FUSED_QKV_NAMES or (kids & _QUERY_NAMES and kids & _KEY_NAMES))


def _unwrap_attention(attn: nn.Module) -> tuple[str, nn.Module] | None:
    """The real attention inside a wrapper that also holds norms (DBRX's ``norm_attn_norm``,
    CPM-Ant's ``self_att``): the wrapper's output is not the attention output."""
    kids = list(attn.named_children())
    if _holds_qk(attn) or not any(_is_norm(m) for _, m in kids):
        return None
    inner = [(n, m) for n, m in kids if _is_attention(n, m, attn) and _holds_qk(m)]
    return inner[0] if inner else None


def _block_parts(model: nn.Module, block: nn.Module) -> _BlockParts:
    nested = _nested_block(block)
    if nested is not None:
        sub = _block_parts(model, nested[1])
        p = nested[0]
        sub.attn = f"{p}.{sub.attn}" if sub.attn else None
        sub.heads_site = f"{p}.{sub.heads_site}" if sub.heads_site else None
        sub.mlp = (f"{p}.{sub.mlp[0]}", sub.mlp[1]) if sub.mlp else None
        return sub
    parts = _BlockParts()
    children = list(block.named_children())
    mixers = sorted({type(m).__name__ for n, m in children if _is_mixer(n, m, block)})
    try:
        aname, attn = _child(block, _ATTN_NAMES, "attention")
    except ValueError:
        lists = [
            (n, m)
            for n, m in children
            if isinstance(m, nn.ModuleList) and any(_is_attention(n, a, block) for a in m)
        ]
        if lists:
            n, m = lists[0]
            parts.why_no_attn = (
                f"{type(block).__name__} runs {len(m)} attention sub-layers ({n}.0 .. "
                f"{n}.{len(m) - 1}), so one codebook per block has no single place"
            )
        else:
            what = f"its token mixer is {', '.join(mixers)}" if mixers else "no attention module"
            parts.why_no_attn = f"{type(block).__name__} has no softmax attention ({what})"
    else:
        inner = _unwrap_attention(attn)
        if inner is not None:
            aname, attn = f"{aname}.{inner[0]}", inner[1]
        parts.attn = aname
        try:
            oname, _ = _out_proj(attn)
            parts.heads = _num_heads(model, attn)
            parts.heads_site = f"{aname}.{oname}"
        except ValueError as e:
            parts.why_no_heads = str(e)
    try:
        mname, _ = _child(block, _MLP_NAMES, "mlp")
        parts.mlp = (mname, "output")
    except ValueError:
        # No MLP submodule: the MLP is bare projections on the layer (OPT's fc1/fc2, BERT's
        # intermediate.dense/output.dense). Its output is the last one's output.
        skip = {
            n
            for n, m in children
            if _is_attention(n, m, block) or _is_mixer(n, m, block) or _is_cross(n)
        }
        linears = [
            p
            for p, m in block.named_modules()
            if p and _is_linear(m) and p.split(".", 1)[0] not in skip
        ]
        if len(linears) >= 2:
            parts.mlp = (linears[-1], "output")
        else:
            what = f"; its token mixer is {', '.join(mixers)}" if mixers else ""
            parts.why_no_mlp = f"{type(block).__name__} has no MLP{what}"
    return parts


def _site(p: str, i: int, bpath: str, parts: _BlockParts) -> HookSite | str:
    """The hook site of placement ``p`` on block ``i``, or the reason it has none."""
    name = f"layers.{i}.{p}"
    if p == "residual":
        return HookSite(name, bpath, "output", p, i)
    if p == "mlp_out":
        if parts.mlp is None:
            return parts.why_no_mlp
        return HookSite(name, f"{bpath}.{parts.mlp[0]}", parts.mlp[1], p, i)
    if parts.attn is None:
        return parts.why_no_attn
    if p == "attn_out":
        return HookSite(name, f"{bpath}.{parts.attn}", "output", p, i)
    if parts.heads_site is None:
        return parts.why_no_heads
    return HookSite(name, f"{bpath}.{parts.heads_site}", "input", p, i, groups=parts.heads)


def _unavailable(
    model: nn.Module, placement: str, reason: str, works: list[str], prefix: str, block: nn.Module
) -> str:
    kids = [n for n, m in block.named_children() if not _is_norm(m)]
    example = f"{prefix}.*.{kids[0]}" if kids else f"{prefix}.*"
    instead = f"placements that work on this model: {works}; or name" if works else "name"
    return (
        f"placement {placement!r} is not available on {architecture_name(model)}: {reason}, "
        f"in every block. Instead use {instead} modules with "
        f"CodebookConfig(modules=[...globs...]), e.g. modules=[{example!r}]"
    )


def resolve_sites(model: nn.Module, config: CodebookConfig) -> list[HookSite]:
    """Turn the config's placements, layers and globs into concrete hook sites.

    With ``layers='all'`` a placement goes on every block that has its component; a
    placement that no block supports, or an explicit layer without it, raises ``ValueError``.
    """
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
        parts: dict[int, _BlockParts] = {}

        def site(p: str, i: int) -> HookSite | str:
            if i not in parts:
                parts[i] = _block_parts(model, blocks[i])
            return _site(p, i, f"{prefix}.{i}", parts[i])

        found: dict[str, list[HookSite]] = {p: [] for p in config.placements}
        for p in config.placements:
            missing: list[tuple[int, str]] = []
            for i in layers:
                s = site(p, i)
                if isinstance(s, HookSite):
                    found[p].append(s)
                else:
                    missing.append((i, s))
            if not missing or (found[p] and config.layers == "all"):
                continue
            i, why = missing[0]
            ok = [j for j in range(n) if isinstance(site(p, j), HookSite)]
            if ok:
                raise ValueError(
                    f"layers={config.layers!r} is invalid for placement {p!r} on "
                    f"{architecture_name(model)}: block {i}: {why}; blocks with it: {ok}"
                )
            works = [
                q
                for q in PLACEMENTS
                if q != p and any(isinstance(site(q, j), HookSite) for j in range(n))
            ]
            raise ValueError(_unavailable(model, p, why, works, prefix, blocks[i]))
        for i in layers:
            for p in config.placements:
                sites.extend(s for s in found[p] if s.layer == i)
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
    modules = dict(model.named_modules(remove_duplicate=False))
    owner: dict[tuple[int, str, str], str] = {}
    for s in sites:
        if s.name in seen:
            raise ValueError(f"codebook {s.name!r} is placed twice; remove the duplicate")
        seen.add(s.name)
        # One module object reused by several blocks would run every block's codebook.
        key = (id(modules[s.module]), s.hook, s.placement)
        if key in owner and s.placement != "module":
            raise ValueError(
                f"codebooks {owner[key]!r} and {s.name!r} would hook the same module object "
                f"({s.module}, shared between blocks of {architecture_name(model)}); name "
                "one block's modules with CodebookConfig(modules=[...globs...]) instead"
            )
        owner[key] = s.name
    return sites


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find an activation tensor in a {type(value).__name__}")


@torch.no_grad()
def _measure_widths(model: nn.Module, sites: list[HookSite]) -> None:
    """One dummy forward pass to read every site's activation width.

    Named placements must see a ``(batch, seq, width)`` tensor (an MoE that flattens tokens, or
    routed attention heads, do not) so that codes keep their documented shapes.
    """
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def record(site: HookSite) -> Any:
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any = None) -> None:
            if site.hook == "input":
                t = _first_tensor(args if args else list(kwargs.values()))
            else:
                t = _first_tensor(out)
            shapes.setdefault(site.name, tuple(t.shape))
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
        with eval_mode(model):
            model(input_ids=torch.ones(_PROBE_SHAPE, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    tokens = _PROBE_SHAPE[0] * _PROBE_SHAPE[1]
    for s in sites:
        if s.dim <= 0:
            raise ValueError(f"codebook {s.name}: module {s.module} did not run in a forward pass")
        shape = shapes[s.name]
        s.flat = s.layer is not None and len(shape) == 2 and shape[0] == tokens
        if s.placement != "module" and len(shape) > 3:
            # (batch, seq, groups, width): DeepSeek-V4's grouped heads and its parallel
            # residual streams; quantized as one (batch, seq, groups * width) activation.
            s.dim = math.prod(shape[2:])
        if s.placement != "module" and shape[:2] != _PROBE_SHAPE and not s.flat:
            raise ValueError(
                f"codebook {s.name}: module {s.module} of {architecture_name(model)} sees a "
                f"{list(shape)} tensor for a {list(_PROBE_SHAPE)} (batch, seq) input, "
                f"not (batch, seq, width); placement {s.placement!r} cannot go there. Use "
                "CodebookConfig(modules=[...globs...]) to choose another module"
            )
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
    _measure_widths(model, sites)
    return CodebookModel(model, config, sites)
