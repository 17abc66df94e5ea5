"""Sparse autoencoders (SAELens, EleutherAI sparsify) as dictionaries next to codebooks.

The peers are optional (``pip install codebook-lens[saes]``) and imported only when an SAE
is loaded; codebooks need neither.
"""

from codebook_lens.codes.saes.dictionary import (
    EXTRA_HINT,
    CodebookDictionary,
    DenseDictionary,
    Dictionary,
    TopK,
    module_site,
    top_k_of,
)
from codebook_lens.codes.saes.model import (
    SAE_PREFIX,
    DictionaryModel,
    Latents,
    dictionary_name,
    load_cache_saes,
    load_saes,
)
from codebook_lens.codes.saes.saelens_adapter import (
    SUPPORTED_HOOKS,
    SAELensDictionary,
    load_saelens,
    saelens_from_pretrained,
    saelens_site,
)
from codebook_lens.codes.saes.sites import (
    LatentEdit,
    LatentRecording,
    as_dictionary,
    capture_activations,
    hook_site,
    record_latents,
    splice,
)
from codebook_lens.codes.saes.sparsify_adapter import (
    SparsifyDictionary,
    load_sparsify,
    load_sparsify_run,
    sparsify_site,
)

__all__ = [
    "EXTRA_HINT",
    "SAE_PREFIX",
    "SUPPORTED_HOOKS",
    "CodebookDictionary",
    "DenseDictionary",
    "Dictionary",
    "DictionaryModel",
    "Latents",
    "LatentEdit",
    "LatentRecording",
    "SAELensDictionary",
    "SparsifyDictionary",
    "TopK",
    "as_dictionary",
    "capture_activations",
    "dictionary_name",
    "hook_site",
    "load_cache_saes",
    "load_saelens",
    "load_saes",
    "load_sparsify",
    "load_sparsify_run",
    "module_site",
    "record_latents",
    "saelens_from_pretrained",
    "saelens_site",
    "sparsify_site",
    "splice",
    "top_k_of",
]
