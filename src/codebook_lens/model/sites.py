"""Where codebooks go in a Hugging Face causal LM: blocks, attention / MLP modules, hook sites.

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
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from codebook_lens.model.config import PLACEMENTS, CodebookConfig

# Names are hints tried before structure; order matters (first match wins).
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention", "mixer")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "moe", "mixer")
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


def natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "gettext_config"):
        with contextlib.suppress(Exception):
            cfg = cfg.gettext_config()
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
    cfg = text_config(model)
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


def is_attention(name: str, mod: nn.Module, parent: nn.Module | None = None) -> bool:
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


def is_mlp(name: str, mod: nn.Module, parent: nn.Module | None = None) -> bool:
    """An MLP / MoE block: says so in its class name (RWKV's channel mix too), or is named
    like one and is no token mixer."""
    cls = type(mod).__name__.lower()
    if _is_linear(mod) or _is_norm(mod) or is_attention(name, mod, parent):
        return False
    if any(h in cls for h in _MLP_CLASS_HINTS):
        return True
    return name in MLP_NAMES and not _is_mixer(name, mod, parent)


def child(block: nn.Module, names: tuple[str, ...], cls_hint: str) -> tuple[str, nn.Module]:
    """The block's attention (``cls_hint`` 'attention') or MLP ('mlp') submodule.

    Names in ``names`` are tried first, then any child whose structure says so (see
    ``is_attention`` / ``is_mlp``). ``ValueError`` if there is none.
    """
    test = is_attention if "att" in cls_hint.lower() else is_mlp
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
    cfg = text_config(model)
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
        if any(is_attention(k, c, m) for k, c in kids.items()) and any(
            is_mlp(k, c, m) for k, c in kids.items()
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
    inner = [(n, m) for n, m in kids if is_attention(n, m, attn) and _holds_qk(m)]
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
        aname, attn = child(block, ATTN_NAMES, "attention")
    except ValueError:
        lists = [
            (n, m)
            for n, m in children
            if isinstance(m, nn.ModuleList) and any(is_attention(n, a, block) for a in m)
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
        mname, _ = child(block, MLP_NAMES, "mlp")
        parts.mlp = (mname, "output")
    except ValueError:
        # No MLP submodule: the MLP is bare projections on the layer (OPT's fc1/fc2, BERT's
        # intermediate.dense/output.dense). Its output is the last one's output.
        skip = {
            n
            for n, m in children
            if is_attention(n, m, block) or _is_mixer(n, m, block) or _is_cross(n)
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
    sites = _placement_sites(model, config) if config.placements else []
    sites.extend(_glob_sites(model, config.modules))
    _check_unique(model, sites)
    return sites


def _chosen_layers(layers: Literal["all"] | list[int], n: int) -> list[int]:
    """Block indices of ``CodebookConfig.layers`` on a model with ``n`` blocks, sorted, >= 0."""
    if layers == "all":
        return list(range(n))
    chosen = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(
                f"layers={layers!r} is invalid: index {i} is out of range for a "
                f"model with {n} blocks (allowed: {-n} .. {n - 1})"
            )
        chosen.append(i % n)
    return sorted(set(chosen))


def _placement_sites(model: nn.Module, config: CodebookConfig) -> list[HookSite]:
    """The named placements' sites, block by block (placements in config order per block)."""
    prefix, blocks = find_blocks(model)
    n = len(blocks)
    layers = _chosen_layers(config.layers, n)
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
    return [s for i in layers for p in config.placements for s in found[p] if s.layer == i]


def _glob_sites(model: nn.Module, patterns: list[str]) -> list[HookSite]:
    """One output site per module matching each glob; a glob matching nothing raises."""
    names = [n for n, _ in model.named_modules() if n]
    sites: list[HookSite] = []
    for pattern in patterns:
        matched = sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=natural_key)
        if not matched:
            near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            hint = f" Nearby module names: {near}" if near else f" Some module names: {names[:8]}"
            raise ValueError(f"modules: the glob {pattern!r} matches no module of the model.{hint}")
        sites.extend(HookSite(m, m, "output", "module", None) for m in matched)
    return sites


def _check_unique(model: nn.Module, sites: list[HookSite]) -> None:
    """Each codebook name once, and no module object hooked twice for one placement."""
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
