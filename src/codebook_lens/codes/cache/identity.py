"""A model's identity (what makes its codes comparable) and the check that a cache is its own."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codebook_lens.codes.cache.reader import CodeCache
    from codebook_lens.codes.saes.model import DictionaryModel
    from codebook_lens.model.codebook_model import CodebookModel


def model_identity(model: CodebookModel | DictionaryModel) -> dict[str, Any]:
    """What makes a model's codes comparable: its config, codebook names, code vectors and (if
    affine) the codebooks' LayerNorm weights; with SAEs (a ``DictionaryModel``) also their
    names and weights. A plain Hugging Face model under SAEs has no codebook fields."""
    dictionaries = getattr(model, "dictionaries", None)
    inner = getattr(model, "inner", model)
    if not hasattr(inner, "codebooks"):  # a plain Hugging Face model read by SAEs
        base_cfg = getattr(inner, "config", None)
        ident: dict[str, Any] = {
            **_base_fields(base_cfg),
            "config_hash": "",
            "codebook_hash": "",
            "codebooks": [],
        }
    else:
        ident = _codebook_identity(inner)  # type: ignore[arg-type]
    if dictionaries is not None:
        ident["dictionaries"] = list(dictionaries)
        ident["dictionary_hash"] = _dictionary_hash(dictionaries)
    return ident


def _base_fields(base_cfg: Any) -> dict[str, Any]:
    return {
        "base_model": str(getattr(base_cfg, "_name_or_path", "") or ""),
        "model_type": str(getattr(base_cfg, "model_type", "") or ""),
        "vocab_size": int(getattr(base_cfg, "vocab_size", 0) or 0),
    }


def _dictionary_hash(dictionaries: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of every dictionary's name, kind and weights."""
    h = hashlib.sha256()
    for name, d in dictionaries.items():
        h.update(f"{name}\0{d.kind}\0".encode())
        for key, t in sorted(d.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _codebook_identity(model: CodebookModel) -> dict[str, Any]:
    base_cfg = getattr(model.base, "config", None)
    # Only the fields that decide which codes a token gets: new config fields with defaults
    # (training options, say) must not make every existing cache look foreign.
    code_fields = ("num_codes", "k", "similarity", "reduction", "layer_norm", "placements",
                   "layers", "modules")  # fmt: skip
    full = model.config.to_dict()
    fields = {f: full.get(f) for f in code_fields}
    # The affine LayerNorm changes every code, so it is part of the identity; only when on,
    # so the identity of a model without it (and every cache built before) stays the same.
    if full.get("layer_norm_affine"):
        fields["layer_norm_affine"] = True
    cfg_json = json.dumps(fields, sort_keys=True)
    h = hashlib.sha256()
    for name, layer in model.codebooks.items():
        h.update(name.encode())
        h.update(layer.codebook.detach().float().cpu().numpy().tobytes())
        for tag, p in ((b"ln_weight", layer.ln_weight), (b"ln_bias", layer.ln_bias)):
            if p is not None:  # affine LayerNorm only: absent parameters hash as before
                h.update(tag)
                h.update(p.detach().float().cpu().numpy().tobytes())
    return {
        **_base_fields(base_cfg),
        "config_hash": hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
        "codebook_hash": h.hexdigest()[:16],
        "codebooks": list(model.codebooks),
    }


def check_identity(cache: CodeCache, model: CodebookModel | DictionaryModel) -> None:
    """Raise ``ValueError`` if ``cache`` was not built with ``model`` (same codes, same config,
    the same SAEs with the same weights).

    The base model path is informative only (the same model moves between folders).
    """
    want = model_identity(model)
    have = cache.manifest.get("identity", {})
    keys = ("model_type", "vocab_size", "config_hash", "codebooks", "codebook_hash",
            "dictionaries", "dictionary_hash")  # fmt: skip
    diffs = [
        f"{key}: cache has {have.get(key)!r}, model has {want.get(key)!r}"
        for key in keys
        if have.get(key) != want.get(key)
    ]
    if diffs:
        raise ValueError(
            f"{cache.path}: this cache was built with a different model "
            f"(cache: {have.get('base_model')!r}, given: {want['base_model']!r}); "
            + "; ".join(diffs)
            + ". Rebuild the cache with `codebook-lens cache` for this model."
        )
