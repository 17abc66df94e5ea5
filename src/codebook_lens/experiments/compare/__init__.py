"""``experiment compare``: codebooks against sparse autoencoders at matched size and L0."""

from codebook_lens.experiments.compare.config import METHODS, WORKLOADS, CompareConfig
from codebook_lens.experiments.compare.methods import (
    FitSpec,
    Fitted,
    IdentityDictionary,
    explained_variance,
    fit,
    recommended_lr,
    sweep,
)
from codebook_lens.experiments.compare.run import format_summary, run_compare
from codebook_lens.experiments.compare.synthetic import make_world, run_synthetic

__all__ = [
    "METHODS",
    "WORKLOADS",
    "CompareConfig",
    "FitSpec",
    "Fitted",
    "IdentityDictionary",
    "explained_variance",
    "fit",
    "format_summary",
    "make_world",
    "recommended_lr",
    "run_compare",
    "run_synthetic",
    "sweep",
]
