"""Open checkpoints of the paper's own code (``codebook-features``) as codebook-lens models.

A reference checkpoint is a folder or hub repository holding ``config.json`` with
``model_type: "codebook"`` and the state dict of the whole wrapped model, base included, in
``model.safetensors`` or ``pytorch_model.bin`` (safetensors preferred; the ``.bin`` file is a
pickle and is only ever read with ``torch.load(..., weights_only=True)``, which runs no code).
Its config describes the codebooks only, so the base model's ``config.json`` comes from
``base`` (a folder holding just that file is enough); every weight comes from the checkpoint.

The reference's codebook layer, expressed with our options:

- a LayerNorm with weight and bias on the codebook input (``layer_norm_affine``), used for
  scoring only;
- its ``inner_product`` ranks codes by ``x_norm . c / |c|``: the order of our ``cosine``
  (``euclidean`` stays ``euclidean``);
- the output is the mean of the k chosen raw codes (``reduction="mean"``) and replaces the
  activation.

Placements: ``attn_preproj`` with a ``group`` codebook (one per head, on the merged head outputs
before the attention output projection) -> ``attn_heads``; ``mlp`` (the MLP block's output) ->
``mlp_out``; ``attn`` (the attention block's output) -> ``attn_out``; ``transformer_block`` ->
``residual``. The mapping from our codebook names to the reference's keys is kept in the
converted model's ``codebook_config.json`` under ``origin``. Finding and reading the
checkpoint's files is ``reference_files.py``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.config import read_json
from codebook_lens.model.codebook_model import (
    CodebookModel,
    ForeignFormat,
    attach_codebooks,
    register_format,
)
from codebook_lens.model.config import CodebookConfig
from codebook_lens.model.reference_files import (
    REFERENCE_MODEL_TYPE,
    is_hub_id,
    is_reference_checkpoint,
    read_weights,
    reference_files,
)
from codebook_lens.model.tokenizer import resolve_tokenizer

ORIGIN_FORMAT = "codebook-features"

# The reference's module paths in each base architecture it supports: (blocks, attention, mlp).
_ARCH_PATHS: dict[str, tuple[str, str, str]] = {
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "gpt_neo": ("transformer.h", "attn.attention", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
}
# Reference ``codebook_at`` -> our placement (the ones both sides can express exactly).
_PLACEMENTS = {
    "attn_preproj": "attn_heads",
    "mlp": "mlp_out",
    "attn": "attn_out",
    "transformer_block": "residual",
}
_UNSUPPORTED_AT = ("mlp_mid", "qkv", "attn_plus_mlp")
_BROADCAST = ("codebook_type", "num_codebooks", "k_codebook", "num_codes")
_BROADCAST_DEFAULTS: dict[str, Any] = {
    "codebook_type": "vanilla",
    "num_codebooks": 1,
    "k_codebook": 1,
    "num_codes": 100,
}


# ------------------------------------------------------------------ the config
@dataclass
class ReferenceConfig:
    """The codebook fields of a reference ``config.json``, validated and broadcast."""

    codebook_at: list[str]
    """Where each codebook kind sits in every snapped layer, e.g. ``["attn_preproj", "mlp"]``."""
    codebook_type: list[str]
    """'vanilla' or 'group' for each entry of ``codebook_at``."""
    num_codebooks: list[int]
    """Codebooks in each group (-1 = one per attention head)."""
    k_codebook: list[int]
    """Codes chosen per token (and per group member)."""
    num_codes: list[int]
    """Codes in each codebook."""
    layers_to_snap: str | list[int]
    """'all' or block indices (negative allowed)."""
    similarity_metric: str
    """'inner_product' (x_norm . c / |c|) or 'euclidean'."""
    loss: str
    """Training loss name ('aeloss', 'base', 'fullaeloss[-b]', 'vqvae[-b]')."""
    raw: dict[str, Any]
    """The whole file as read."""


def parse_reference_config(data: Any, source: str) -> ReferenceConfig:
    """Validate a reference ``config.json`` (already parsed); errors name ``source``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    _check_model_type(data, source)
    at = data.get("codebook_at", "mlp")
    at = [at] if isinstance(at, str) else at
    if not isinstance(at, list) or not at or not all(isinstance(a, str) for a in at):
        raise ValueError(f"{source}: codebook_at={at!r} is invalid; expected a list of names")
    if len(set(at)) != len(at):
        raise ValueError(f"{source}: codebook_at={at!r} names a placement twice")
    lists = _broadcast_fields(data, len(at), source)
    layers = data.get("layers_to_snap", [])
    if layers != "all" and not (
        isinstance(layers, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise ValueError(
            f"{source}: layers_to_snap={layers!r} is invalid; expected 'all' or a list of indices"
        )
    if isinstance(layers, list) and not layers:
        raise ValueError(f"{source}: layers_to_snap=[] places no codebook; nothing to convert")
    sim = data.get("similarity_metric", "inner_product")
    if sim not in ("inner_product", "euclidean"):
        raise ValueError(
            f"{source}: similarity_metric={sim!r} is invalid; the reference knows "
            "'inner_product' and 'euclidean'"
        )
    loss = data.get("loss", "aeloss")
    if not isinstance(loss, str):
        raise ValueError(f"{source}: loss={loss!r} is invalid; expected a string")
    return ReferenceConfig(
        codebook_at=list(at),
        codebook_type=lists["codebook_type"],
        num_codebooks=lists["num_codebooks"],
        k_codebook=lists["k_codebook"],
        num_codes=lists["num_codes"],
        layers_to_snap=layers,
        similarity_metric=sim,
        loss=loss,
        raw=data,
    )


def _check_model_type(data: dict[str, Any], source: str) -> None:
    """Raise unless ``data`` is a reference config (naming what it is instead)."""
    model_type = data.get("model_type")
    if model_type == REFERENCE_MODEL_TYPE:
        return
    if data.get("format") == "codebook-lens":
        raise ValueError(
            f"{source}: this is already a codebook-lens model; load it with "
            "CodebookModel.from_pretrained(folder) (no conversion needed)"
        )
    raise ValueError(
        f"{source}: model_type={model_type!r}, not {REFERENCE_MODEL_TYPE!r}: this is not a "
        "checkpoint of the paper's reference code (codebook-features). Pass the folder or "
        "hub id of a reference codebook model, e.g. taufeeque/TokFSM_k1_codebook_model"
    )


def _broadcast_fields(data: dict[str, Any], n: int, source: str) -> dict[str, list[Any]]:
    """The per-placement fields as lists of ``n`` entries (a single value applies to all)."""
    lists: dict[str, list[Any]] = {}
    for key in _BROADCAST:
        value = data.get(key, _BROADCAST_DEFAULTS[key])
        if isinstance(value, list):
            if len(value) != n:
                raise ValueError(
                    f"{source}: {key}={value!r} has {len(value)} entries, but codebook_at has "
                    f"{n}; the reference needs one per codebook_at entry"
                )
            lists[key] = value
        else:
            lists[key] = [value] * n
    for t in lists["codebook_type"]:
        if t not in ("vanilla", "group"):
            raise ValueError(
                f"{source}: codebook_type={t!r} is invalid; the reference knows 'vanilla', 'group'"
            )
    for key in ("num_codebooks", "k_codebook", "num_codes"):
        for v in lists[key]:
            ok = isinstance(v, int) and not isinstance(v, bool)
            if not ok or (v < 1 and not (key == "num_codebooks" and v == -1)):
                raise ValueError(
                    f"{source}: {key} entry {v!r} is invalid; expected an integer >= 1"
                )
    return lists


def codebook_config_for(ref: ReferenceConfig, heads: int, source: str) -> CodebookConfig:
    """Our ``CodebookConfig`` that computes what the reference config describes."""
    for at, typ, n in zip(ref.codebook_at, ref.codebook_type, ref.num_codebooks, strict=True):
        if at in _UNSUPPORTED_AT:
            raise ValueError(
                f"{source}: codebook_at={at!r} is not supported by codebook-lens; supported: "
                f"{', '.join(repr(a) for a in _PLACEMENTS)}"
            )
        if at not in _PLACEMENTS:
            raise ValueError(
                f"{source}: codebook_at={at!r} is not a placement of the reference code; "
                f"supported: {', '.join(repr(a) for a in _PLACEMENTS)}"
            )
        if at == "attn_preproj" and (typ != "group" or n not in (-1, heads)):
            raise ValueError(
                f"{source}: codebook_at='attn_preproj' with codebook_type={typ!r} and "
                f"num_codebooks={n} is not supported; codebook-lens expresses it as one codebook "
                f"per head (codebook_type 'group', num_codebooks -1 or {heads} heads)"
            )
        if at != "attn_preproj" and (typ != "vanilla" or n != 1):
            raise ValueError(
                f"{source}: codebook_at={at!r} with codebook_type={typ!r} is not supported; "
                "codebook-lens expresses it with one ('vanilla') codebook"
            )
    order = ref.codebook_at
    if "transformer_block" in order and order[-1] != "transformer_block":
        raise ValueError(
            f"{source}: codebook_at={order} puts 'transformer_block' before other placements; the "
            "reference code then never runs those codebooks, so this is not supported (only as "
            "the last entry)"
        )
    if (
        "attn" in order
        and "attn_preproj" in order
        and order.index("attn") < order.index("attn_preproj")
    ):
        raise ValueError(
            f"{source}: codebook_at={order} puts 'attn' before 'attn_preproj'; the reference code "
            "then drops the 'attn' codebook, so this is not supported"
        )
    for key in ("num_codes", "k_codebook"):
        values = getattr(ref, key)
        if len(set(values)) > 1:
            raise ValueError(
                f"{source}: {key}={values} differs between placements; codebook-lens models use "
                "one value for every codebook"
            )
    loss = ref.loss.split("-")
    commitment = 0.0
    if loss[0] in ("vqvae", "fullaeloss"):
        # The reference's input-side term; its default beta is 0.25 (only matters for training).
        commitment = float(loss[1]) if len(loss) > 1 else 0.25
    layers = ref.layers_to_snap
    return CodebookConfig(
        num_codes=ref.num_codes[0],
        k=ref.k_codebook[0],
        similarity="cosine" if ref.similarity_metric == "inner_product" else "euclidean",
        reduction="mean",
        layer_norm=True,
        layer_norm_affine=True,
        recon_weight=0.0 if loss[0] == "base" else 1.0,
        commitment_weight=commitment,
        placements=[_PLACEMENTS[a] for a in ref.codebook_at],
        layers="all" if layers == "all" else sorted(set(layers)),  # type: ignore[arg-type]
    )


# -------------------------------------------------------------------- the base
def base_config(base: str | os.PathLike[str] | None, *, local_files_only: bool = False) -> Any:
    """The transformers config of the base model, from ``base``'s ``config.json``."""
    from transformers import AutoConfig

    if base is None or str(base) == "":
        raise ValueError(
            "base is missing: a reference checkpoint's config.json describes only its codebooks. "
            "Pass --base (base= in Python): a folder or hub id whose config.json describes the "
            "base model it was trained from, e.g. EleutherAI/pythia-410m-deduped or "
            "roneneldan/TinyStories-1Layer-21M (a folder holding only that config.json is enough)"
        )
    b = Path(str(base)).expanduser()
    if b.is_dir() and not (b / "config.json").is_file():
        raise FileNotFoundError(
            f"--base {base}: no config.json in this folder; pass a folder or hub id whose "
            "config.json describes the base model"
        )
    if not b.exists() and not is_hub_id(str(base)):
        raise FileNotFoundError(f"--base {base}: no such folder (and not a hub id)")
    if b.is_dir():
        raw = read_json(b / "config.json")
        if isinstance(raw, dict) and raw.get("model_type") == REFERENCE_MODEL_TYPE:
            raise ValueError(
                f"--base {base}: this is a codebook checkpoint (model_type 'codebook'); --base "
                "takes the config.json of the base model the codebooks were trained on"
            )
    try:
        cfg = AutoConfig.from_pretrained(str(base), local_files_only=local_files_only)
    except Exception as e:  # bad JSON, unknown model_type, offline hub: one clear message
        raise ValueError(
            f"--base {base}: cannot read its config.json as a transformers config "
            f"({type(e).__name__}: {e})"
        ) from None
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _ARCH_PATHS:
        raise ValueError(
            f"--base {base}: model_type={model_type!r}; the reference code supports the base "
            f"models {', '.join(repr(a) for a in _ARCH_PATHS)}. Pass the config of the model the "
            "codebooks were trained on"
        )
    return cfg


def _count(cfg: Any, attrs: tuple[str, ...], what: str) -> int:
    for attr in attrs:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    raise ValueError(f"the base config names no number of {what} (looked for {list(attrs)})")


def _is_ignored_buffer(key: str, t: Tensor) -> bool:
    """Buffers older transformers versions saved and newer ones rebuild (rotary, masks)."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("inv_freq", "masked_bias") or (
        leaf == "bias" and (t.dim() == 4 or t.dtype == torch.bool)
    )


def _load_base(cfg: Any, state: dict[str, Tensor], weights: str, base: str) -> nn.Module:
    """The base model with the checkpoint's weights; every mismatch is named.

    transformers itself loads ``state`` (so its key renames between versions apply, e.g.
    GPT-NeoX's ``embed_out`` -> ``lm_head``, and tied weights stored once are fine).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    model, info = cls.from_pretrained(
        None, config=cfg, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problems = [
        f"tensor {key!r} has shape {tuple(got)} in the checkpoint, but the base model needs "
        f"{tuple(want)}"
        for key, got, want in sorted(info.get("mismatched_keys", ()))
    ]
    problems += [
        f"the base model's tensor {key!r} is missing from the checkpoint"
        for key in sorted(info.get("missing_keys", ()))
    ]
    problems += [
        f"tensor {key!r} has no place in the base model"
        for key in sorted(info.get("unexpected_keys", ()))
        if key not in state or not _is_ignored_buffer(key, state[key])
    ]
    buffers = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    for key, t in state.items():
        if (
            key.endswith("inv_freq")
            and buffers
            and not any(
                b.shape == t.shape and torch.allclose(b.float().cpu(), t.float(), rtol=1e-5)
                for b in buffers
            )
        ):
            problems.append(
                f"the rotary frequencies {key!r} (shape {tuple(t.shape)}) differ from the base "
                f"model's (shape {tuple(buffers[0].shape)}): check rotary_pct and rotary_emb_base"
            )
            break
    if problems:
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(
            f"{weights}: does not fit --base {base}: {'; '.join(problems[:4])}{more}. Pass --base "
            "with the config.json of the model these codebooks were trained on"
        )
    model.eval()
    return model  # type: ignore[no-any-return]


# ------------------------------------------------------------------- convert
@dataclass
class _RefSite:
    name: str
    """Our codebook name."""
    at: str
    """Reference ``codebook_at``."""
    layer: int
    prefixes: list[str]
    """State-dict prefix of each member codebook (one per head for a group)."""
    hook_keys: list[str]
    """The reference's code keys (what its ``hook_fn`` receives), one per member."""


def _reference_sites(
    ref: ReferenceConfig, model_type: str, layers: list[int], heads: int
) -> list[_RefSite]:
    """Where each codebook's tensors sit in the reference's state dict.

    Its wrappers nest: ``attn``/``mlp``/``transformer_block`` keep the wrapped module under
    ``module_layer``, so a codebook placed earlier in ``codebook_at`` moves under a later
    wrapper's ``module_layer`` (``codebook_config_for`` has checked the order is one the
    reference builds correctly).
    """
    blocks, attn, mlp = _ARCH_PATHS[model_type]
    wrapped_block, wrapped_attn = "transformer_block" in ref.codebook_at, "attn" in ref.codebook_at
    sites = []
    for i in layers:
        block = f"{blocks}.{i}.module_layer" if wrapped_block else f"{blocks}.{i}"
        stems = {
            "attn_preproj": f"{block}.{attn}{'.module_layer' if wrapped_attn else ''}",
            "attn": f"{block}.{attn}",
            "mlp": f"{block}.{mlp}",
            "transformer_block": f"{blocks}.{i}",
        }
        for at in ref.codebook_at:
            stem = f"model.{stems[at]}.codebook_layer."
            key = f"layer{i}_{at}"
            if at == "attn_preproj":
                prefixes = [f"{stem}codebook.{h}." for h in range(heads)]
                hook_keys = [f"{key}_gcb{h}" for h in range(heads)]
            else:
                prefixes, hook_keys = [stem], [key]
            sites.append(_RefSite(f"layers.{i}.{_PLACEMENTS[at]}", at, i, prefixes, hook_keys))
    return sites


def load_reference(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str] | None,
    *,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
) -> CodebookModel:
    """Build a ``CodebookModel`` from a reference checkpoint (folder or hub id), in memory.

    ``base``: folder or hub id whose ``config.json`` describes the base model. Every weight,
    base and codebooks, is loaded from the checkpoint; any tensor that is missing, left over
    or of the wrong shape raises ``ValueError`` naming the file and the tensor.
    """
    cfg_file, weight_files = reference_files(path, local_files_only=local_files_only)
    ref = parse_reference_config(read_json(cfg_file), str(cfg_file))
    base_cfg = base_config(base, local_files_only=local_files_only)
    model_type = str(base_cfg.model_type)
    heads = _count(base_cfg, ("num_attention_heads", "num_heads", "n_head"), "attention heads")
    n_layers = _count(base_cfg, ("num_hidden_layers", "num_layers", "n_layer"), "layers")
    config = codebook_config_for(ref, heads, str(cfg_file))
    if config.layers == "all":
        layers = list(range(n_layers))
    else:
        assert isinstance(config.layers, list)
        bad = [i for i in config.layers if not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(
                f"{cfg_file}: layers_to_snap={ref.layers_to_snap} names layer(s) {bad}, but "
                f"--base {base} has {n_layers} layers; pass the base these codebooks belong to"
            )
        layers = sorted({i % n_layers for i in config.layers})
        config.layers = layers

    weights_desc = ", ".join(str(w) for w in weight_files)
    state: dict[str, Tensor] = {}
    for w in weight_files:
        state.update(read_weights(w))
    base_state: dict[str, Tensor] = {}
    codebook_state: dict[str, Tensor] = {}
    for key, t in state.items():
        if not key.startswith("model."):
            raise ValueError(
                f"{weights_desc}: tensor {key!r} lacks the 'model.' prefix of the reference's "
                "wrapped model; this is not a reference codebook checkpoint"
            )
        if ".codebook_layer." in key:
            codebook_state[key] = t
        else:  # wrapped modules keep their own weights under module_layer
            base_state[key[len("model.") :].replace(".module_layer.", ".")] = t
    base_model = _load_base(base_cfg, base_state, weights_desc, str(base))
    if device is not None:
        base_model = base_model.to(device)  # type: ignore[arg-type]

    model = attach_codebooks(base_model, config)
    sites = _reference_sites(ref, model_type, layers, heads)
    assert [s.name for s in sites] == list(model.codebooks), (sites, list(model.codebooks))
    _load_codebooks(model, sites, codebook_state, weights_desc, str(base))
    model.origin = {
        "format": ORIGIN_FORMAT,
        "source": str(path),
        "weights": [w.name for w in weight_files],
        "base": str(base),
        "reference_config": ref.raw,
        "codebooks": {
            s.name: {
                "codebook_at": s.at,
                "layer": s.layer,
                "reference_keys": s.hook_keys,
                "state_dict_prefixes": s.prefixes,
            }
            for s in sites
        },
    }
    model.eval()
    return model


def _load_codebooks(
    model: CodebookModel,
    sites: list[_RefSite],
    state: dict[str, Tensor],
    weights: str,
    base: str,
) -> None:
    used: set[str] = set()
    ln_absent = [
        p
        for s in sites
        for p in s.prefixes
        if f"{p}ln.weight" not in state and f"{p}ln.bias" not in state
    ]
    all_ln_absent = len(ln_absent) == sum(len(s.prefixes) for s in sites)
    if all_ln_absent:
        # Checkpoints without the LayerNorm: the reference then runs it at its initial values.
        warnings.warn(
            f"{weights}: no codebook LayerNorm weights; using weight 1 and bias 0, as the "
            "reference code does when they are absent",
            stacklevel=3,
        )
    with torch.no_grad():
        for site in sites:
            layer = model.codebooks[site.name]
            assert layer.ln_weight is not None and layer.ln_bias is not None
            g, c, d = layer.codebook.shape
            for h, prefix in enumerate(site.prefixes):
                for leaf, target, shape in (
                    ("codebook.weight", layer.codebook[h], (c, d)),
                    ("ln.weight", layer.ln_weight[h], (d,)),
                    ("ln.bias", layer.ln_bias[h], (d,)),
                ):
                    key = prefix + leaf
                    if key not in state:
                        if leaf.startswith("ln.") and all_ln_absent:
                            continue
                        raise ValueError(
                            f"{weights}: tensor {key!r} (codebook {site.name}) is missing; the "
                            "checkpoint is incomplete or its config.json does not belong to it"
                        )
                    t = state[key]
                    if tuple(t.shape) != shape:
                        raise ValueError(
                            f"{weights}: tensor {key!r} has shape {tuple(t.shape)}, but codebook "
                            f"{site.name} on --base {base} needs {shape} (num_codes from "
                            "config.json, width from the base model); pass the base these "
                            "codebooks were trained on"
                        )
                    target.copy_(t.to(target.dtype))
                    used.add(key)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(
            f"{weights}: tensor(s) {extra[:4]} belong to no codebook that config.json places; "
            "the config and the weights do not match"
        )
    for layer in model.codebooks.values():
        layer.train(layer.training)  # drop cached scoring weights after the writes


def convert_reference(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    base: str | os.PathLike[str] | None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    local_files_only: bool = False,
) -> CodebookModel:
    """Convert a reference checkpoint into a codebook-lens folder ``out`` (safetensors + JSON).

    Everything is loaded and checked in memory first; the folder is then written to a
    temporary name and renamed into place, so a failure leaves nothing behind.
    """
    target = Path(out)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(
            f"{target}: already exists and is not empty; choose a new folder or pass --overwrite"
        )
    model = load_reference(path, base, local_files_only=local_files_only)
    tok = resolve_tokenizer(tokenizer, int(getattr(model.base.config, "vocab_size", 0)))
    model.save_pretrained(target, tokenizer=tok)
    return model


register_format(ForeignFormat("reference", is_reference_checkpoint, load_reference))
