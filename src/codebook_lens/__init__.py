"""codebook-lens: sparse, discrete, steerable codebook features for any Hugging Face causal LM."""

from .attach import CodebookModel, CodeRecording, HookSite, attach_codebooks
from .config import CodebookConfig
from .layer import CodebookLayer, CodebookOutput, LayerStats

# Importing reference registers the paper's checkpoint format with from_pretrained.
from .reference import convert_reference, load_reference

__all__ = [
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
__version__ = "0.1.0"
