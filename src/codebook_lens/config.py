"""Typed configs: each dataclass is the Python API, the CLI flags and the saved JSON.

Every field has a docstring under it (shown in ``--help``); invalid values raise
``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

Similarity = Literal["cosine", "inner_product", "euclidean"]
Reduction = Literal["sum", "mean"]
Placement = Literal["attn_heads", "attn_out", "mlp_out", "residual"]
NonFinite = Literal["raise", "skip"]
ScoreDtype = Literal["float32", "bfloat16"]

SIMILARITIES: tuple[str, ...] = get_args(Similarity)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinite)
SCORE_DTYPES: tuple[str, ...] = get_args(ScoreDtype)


def _choices(values: tuple[Any, ...]) -> str:
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def check_choice(name: str, value: object, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str | int | float | bool | None) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; choose {_choices(allowed)}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is invalid; it must be a number")
    if value != value:  # NaN
        raise ValueError(f"{name}={value!r} is invalid; it must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(p for p in (lo, hi) if p)
        raise ValueError(f"{name}={value!r} is invalid; it must be {allowed}")


@dataclass
class CodebookConfig:
    """Where codebooks go in a model and how every codebook behaves.

    Example: ``CodebookConfig(num_codes=1000, k=1, placements=["attn_heads", "mlp_out"])``.
    """

    num_codes: int = 10_000
    """Codes per codebook (C). The paper uses 10,000 for language models, 1,000 for the FSM."""

    k: int = 8
    """Codes chosen per token (and per head for grouped codebooks)."""

    similarity: Similarity = "cosine"
    """How codes are scored against an activation: 'cosine', 'inner_product' or 'euclidean'."""

    reduction: Reduction = "sum"
    """Output is the 'sum' (paper) or the 'mean' (reference code) of the k chosen codes."""

    recon_weight: float = 1.0
    """Weight of the reconstruction loss mean |a - output|^2 that pulls chosen codes to inputs."""

    commitment_weight: float = 0.0
    """Weight of the VQ-VAE commitment loss |a - sg(output)|^2 on the input (0 = off)."""

    layer_norm: bool = False
    """LayerNorm the input before scoring; the output then stays in the normalised space."""

    layer_norm_affine: bool = False
    """Give that LayerNorm a learned weight and bias per codebook (the reference code's; saved
    with the codebooks); needs layer_norm."""

    kmeans_init: bool = False
    """Initialise each codebook by k-means on the first training batch it sees."""

    kmeans_iters: int = 10
    """Lloyd iterations for k-means initialisation."""

    dead_code_steps: int = 0
    """Re-initialise codes unused for this many optimizer steps from recent inputs (0 = off)."""

    revival_noise: float = 0.01
    """Std of the noise added (relative to the input norm) to revived codes."""

    chunk_size: int = 4096
    """Tokens scored at once; bounds the extra memory to chunk_size x num_codes scores."""

    nonfinite: NonFinite = "raise"
    """NaN/inf activations entering a codebook: 'raise' a clear error before anything is updated
    (one device->host sync per forward on GPU), or 'skip' those (token, head) slices: they pass
    through unquantized with code -1 and never reach the codebook or its statistics (no sync)."""

    score_dtype: ScoreDtype = "float32"
    """Precision of the similarity search: 'float32' (exact), or 'bfloat16': score every code in
    bf16, then re-rank the best k + margin candidates exactly in fp32 (the chosen codes equal
    the fp32 ones on >= 99.9% of tokens, measured in benchmarks/). Faster only on hardware with
    bf16 matrix units (recent GPUs, CPUs with AMX/AVX512-BF16); much slower on other CPUs."""

    placements: list[str] = field(default_factory=lambda: ["attn_heads"])
    """Named placements: 'attn_heads' (one codebook per head, before the attention output
    projection), 'attn_out', 'mlp_out', 'residual' (block output)."""

    layers: Literal["all"] | list[int] = "all"
    """Which blocks get the named placements: 'all' or a list of indices (negative allowed)."""

    modules: list[str] = field(default_factory=list)
    """Extra fnmatch globs over model.named_modules() paths; each match's output is quantized."""

    seed: int = 0
    """Seed for codebook initialisation."""

    def __post_init__(self) -> None:
        if isinstance(self.placements, str):
            self.placements = [self.placements]
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        _check_int("num_codes", self.num_codes, 1)
        _check_int("k", self.k, 1)
        if self.k > self.num_codes:
            raise ValueError(
                f"k={self.k} is invalid; it must be <= num_codes={self.num_codes} "
                "(a token cannot choose more distinct codes than the codebook holds)"
            )
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_range("recon_weight", self.recon_weight, 0.0)
        check_range("commitment_weight", self.commitment_weight, 0.0)
        check_range("revival_noise", self.revival_noise, 0.0)
        _check_int("kmeans_iters", self.kmeans_iters, 0)
        _check_int("dead_code_steps", self.dead_code_steps, 0)
        _check_int("chunk_size", self.chunk_size, 1)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_choice("score_dtype", self.score_dtype, SCORE_DTYPES)
        _check_int("seed", self.seed, 0)
        if self.layer_norm_affine and not self.layer_norm:
            raise ValueError(
                "layer_norm_affine=True is invalid with layer_norm=False; the affine weight and "
                "bias belong to the input LayerNorm, so set layer_norm=True too"
            )
        if not isinstance(self.placements, list) or not all(
            isinstance(p, str) for p in self.placements
        ):
            raise ValueError(f"placements={self.placements!r} is invalid; give a list of names")
        for p in self.placements:
            check_choice("placements", p, PLACEMENTS)
        if not isinstance(self.modules, list) or not all(isinstance(m, str) for m in self.modules):
            raise ValueError(f"modules={self.modules!r} is invalid; give a list of glob strings")
        if self.layers != "all" and not (
            isinstance(self.layers, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ValueError(
                f"layers={self.layers!r} is invalid; choose 'all' or a list of integer indices"
            )
        if not self.placements and not self.modules:
            raise ValueError(
                "placements=[] and modules=[] is invalid; name at least one placement "
                f"({_choices(PLACEMENTS)}) or one module glob"
            )

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every ``CodebookLayer`` this config creates."""
        return {
            "num_codes": self.num_codes,
            "k": self.k,
            "similarity": self.similarity,
            "reduction": self.reduction,
            "recon_weight": self.recon_weight,
            "commitment_weight": self.commitment_weight,
            "layer_norm": self.layer_norm,
            "layer_norm_affine": self.layer_norm_affine,
            "kmeans_init": self.kmeans_init,
            "kmeans_iters": self.kmeans_iters,
            "dead_code_steps": self.dead_code_steps,
            "revival_noise": self.revival_noise,
            "chunk_size": self.chunk_size,
            "nonfinite": self.nonfinite,
            "score_dtype": self.score_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> CodebookConfig:
        return config_from_dict(cls, data, source=source)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")


T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose runtime check of a JSON value against a dataclass field annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def config_from_dict(cls: type[T], data: Any, *, source: str = "config") -> T:
    """Build dataclass ``cls`` from a JSON object, naming the source and field on any error."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}"
        )
    for name, value in data.items():
        if get_origin(hints[name]) is Literal:
            check_choice(f"{source}: {name}", value, tuple(get_args(hints[name])))
        elif not _type_ok(value, hints[name]):
            raise ValueError(
                f"{source}: field {name!r} has value {value!r} of the wrong type; "
                f"expected {hints[name]}"
            )
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; errors name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
