"""codebook-lens: sparse, discrete, steerable codebook features for any Hugging Face causal LM."""

from codebook_lens.config import __version__
from codebook_lens.model.codebook_model import (
    CodebookModel,
    CodeRecording,
    HookSite,
    attach_codebooks,
)
from codebook_lens.model.config import CodebookConfig
from codebook_lens.model.layer import CodebookLayer, CodebookOutput, LayerStats

# Importing reference registers the paper's checkpoint format with from_pretrained.
from codebook_lens.model.reference import convert_reference, load_reference

__all__ = [
    "__version__",
    "CodebookConfig",
    "CodebookLayer",
    "CodebookModel",
    "CodebookOutput",
    "CodeRecording",
    "HookSite",
    "LayerStats",
    "attach_codebooks",
    "convert_reference",
    "load_reference",
]
