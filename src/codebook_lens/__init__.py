"""codebook-lens: sparse, discrete, steerable codebook features for any Hugging Face causal LM.

The public names below load on first use, so ``import codebook_lens.<stage>`` (the CLI, the
search workers) does not pay for torch and transformers until it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from codebook_lens.config import __version__

if TYPE_CHECKING:
    from codebook_lens.model.codebook_model import (
        CodebookModel,
        CodeRecording,
        HookSite,
        attach_codebooks,
    )
    from codebook_lens.model.config import CodebookConfig
    from codebook_lens.model.layer import CodebookLayer, CodebookOutput, LayerStats
    from codebook_lens.model.reference import convert_reference, load_reference

_EXPORTS = {
    "CodebookConfig": "codebook_lens.model.config",
    "CodebookLayer": "codebook_lens.model.layer",
    "CodebookOutput": "codebook_lens.model.layer",
    "LayerStats": "codebook_lens.model.layer",
    "CodebookModel": "codebook_lens.model.codebook_model",
    "CodeRecording": "codebook_lens.model.codebook_model",
    "HookSite": "codebook_lens.model.codebook_model",
    "attach_codebooks": "codebook_lens.model.codebook_model",
    "convert_reference": "codebook_lens.model.reference",
    "load_reference": "codebook_lens.model.reference",
}

__all__ = [
    "CodeRecording",
    "CodebookConfig",
    "CodebookLayer",
    "CodebookModel",
    "CodebookOutput",
    "HookSite",
    "LayerStats",
    "__version__",
    "attach_codebooks",
    "convert_reference",
    "load_reference",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codebook_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
