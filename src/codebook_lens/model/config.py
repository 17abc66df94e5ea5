"""``CodebookConfig``: where codebooks go in a model and how each one behaves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from codebook_lens.config import (
    check_choice,
    check_int,
    check_range,
    choices_text,
    config_from_dict,
)

Similarity = Literal["cosine", "inner_product", "euclidean"]
Reduction = Literal["sum", "mean"]
Placement = Literal["attn_heads", "attn_out", "mlp_out", "residual"]
NonFinite = Literal["raise", "skip"]
ScoreDtype = Literal["auto", "float32", "bfloat16"]

SIMILARITIES: tuple[str, ...] = get_args(Similarity)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinite)
SCORE_DTYPES: tuple[str, ...] = get_args(ScoreDtype)


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

    score_dtype: ScoreDtype = "auto"
    """Precision of the similarity search: 'float32' (exact), or 'bfloat16': score every code in
    bf16, then re-rank the best k + margin candidates exactly in fp32 (the chosen codes equal
    the fp32 ones on >= 99.9% of tokens, measured in benchmarks/). Faster only on hardware with
    bf16 matrix units (recent GPUs, CPUs with AMX/AVX512-BF16); much slower on other CPUs.
    'auto': fp32, unless the device has bf16 units and, on the layer's first large search, bf16
    gives exactly the fp32 codes and is faster (``CodebookLayer.score_dtype_reason`` says why)."""

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
        check_int("num_codes", self.num_codes, 1)
        check_int("k", self.k, 1)
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
        check_int("kmeans_iters", self.kmeans_iters, 0)
        check_int("dead_code_steps", self.dead_code_steps, 0)
        check_int("chunk_size", self.chunk_size, 1)
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_choice("score_dtype", self.score_dtype, SCORE_DTYPES)
        check_int("seed", self.seed, 0)
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
                f"({choices_text(PLACEMENTS)}) or one module glob"
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
