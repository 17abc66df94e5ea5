"""Interventions as data: force or ban codes during a forward pass or generation, then restore.

An ``InterventionSpec`` is a list of ``EditSpec``s, loadable from YAML or JSON::

    edits:
      - codebook: layers.0.attn_heads
        codes: [12, 40]          # one id or a list
        head: 2                  # grouped (per-head) codebooks only; omit for every head
        positions: generated     # all | prompt | generated | 5 | [0, 3] | "3:10" | "-1"
        action: force            # force | ban
        slot: replace-lowest     # force: overwrite the lowest-ranked codes, or append
        scale: 1.0               # force: weight of the forced code vectors
      - codebook: sae.transformer.h.0   # an SAE of the model (a DictionaryModel)
        codes: 17                # latent ids
        action: force            # adds value x W_dec[17] at the SAE's site; ban removes
        value: 4.0               # its contribution; no value: scale x its max in a cache

``intervene(model, spec)`` installs the edits on the codebook layers (``CodebookLayer.edit``)
for the duration of a ``with`` block and always removes them, so logits after the block are
bit-identical to before. ``run_with_codes``, ``generate`` and ``ablate`` are built on it.

How an edit acts on one token's codes (per head), with ``k`` codes chosen normally:

- ``ban``: the banned codes' scores are set to ``-inf`` before top-k, so the next-best codes
  are chosen instead.
- ``force`` with ``slot='replace-lowest'``: the forced codes are taken out of the ranking, the
  top ``k`` of the remaining codes are chosen, then the lowest-ranked ones are overwritten by
  the forced codes: the token ends up with the forced codes plus its ``k - m`` best others.
- ``force`` with ``slot='append'``: the forced codes are added after the token's ``k`` best
  others. A codebook with append edits returns ``k + m`` codes at every position; tokens
  outside the edit's positions repeat their last code there with weight 0 (no effect).

An SAE latent (codebook ``sae.<site>`` of a ``DictionaryModel``) is steered the usual SAE way:
``force`` adds ``value x W_dec[latent]`` to the activation at the SAE's site, ``ban`` subtracts
the latent's contribution ``z[latent] x W_dec[latent]``; ``InterventionSpec.resolved(cache)``
fills a missing ``value`` with ``scale`` x the latent's largest activation in the cache.

Positions are absolute token positions in the sequence (prompt first). During generation with a
KV cache each forward pass sees only new tokens; a hook on the base model reads the cache
length before every pass, so position ``p`` means the same token with or without a cache.
Negative indices count back from the end of the prompt (in ``run_with_codes`` the prompt is the
whole input); a slice with no stop (``"3:"``) runs on through every generated token.
Batches are assumed unpadded (every row starts at position 0).
"""

from codebook_lens.codes.intervene.edits import LayerEdit, intervene
from codebook_lens.codes.intervene.generation import (
    Ablation,
    Generation,
    RunResult,
    Sampling,
    ablate,
    encode_prompt,
    generate,
    run_with_codes,
)
from codebook_lens.codes.intervene.loading import (
    cache_saes,
    compare,
    format_side_by_side,
    load_model_and_tokenizer,
    parse_prompt,
)
from codebook_lens.codes.intervene.spec import (
    ACTIONS,
    POSITION_KEYWORDS,
    SLOTS,
    Action,
    EditSpec,
    InterventionSpec,
    Positions,
    Slot,
)

__all__ = [
    "ACTIONS",
    "POSITION_KEYWORDS",
    "SLOTS",
    "Ablation",
    "Action",
    "EditSpec",
    "Generation",
    "InterventionSpec",
    "LayerEdit",
    "Positions",
    "RunResult",
    "Sampling",
    "Slot",
    "ablate",
    "cache_saes",
    "compare",
    "encode_prompt",
    "format_side_by_side",
    "generate",
    "intervene",
    "load_model_and_tokenizer",
    "parse_prompt",
    "run_with_codes",
]
