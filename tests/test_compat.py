"""The KV cache is found by what it is, whatever keyword this transformers version uses."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import ARCHS, tiny_model
from transformers import DynamicCache

from codebook_lens import CodebookConfig, attach_codebooks
from codebook_lens.codes.intervene import EditSpec, InterventionSpec, generate, intervene
from codebook_lens.experiments.fsm.data import FSMConfig, TokFSM, sample_sequences
from codebook_lens.model.kv_cache import (
    CACHE_NAMES,
    cache_keyword,
    cache_kwargs,
    cache_length,
    find_cache_length,
    output_cache,
)


class _OldStyle(torch.nn.Module):
    """A model whose forward still takes ``past_key_values`` (transformers < 5.24)."""

    def forward(self, input_ids: Any = None, past_key_values: Any = None, use_cache: Any = None):
        return input_ids


class _NewStyle(torch.nn.Module):
    def forward(self, input_ids: Any = None, cache: Any = None, use_cache: Any = None):
        return input_ids


def test_keyword_follows_the_signature() -> None:
    assert cache_keyword(_OldStyle()) == "past_key_values"
    assert cache_keyword(_NewStyle()) == "cache"
    assert cache_kwargs(_NewStyle(), None) == {"cache": None, "use_cache": True}


@pytest.mark.parametrize("arch", ARCHS)
def test_keyword_of_installed_models_is_accepted(arch: str) -> None:
    base = tiny_model(arch)
    model = attach_codebooks(base, CodebookConfig(num_codes=16, k=1))
    name = cache_keyword(model)
    assert name in CACHE_NAMES
    assert name == cache_keyword(base)  # the wrapper is seen through to the HF model
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from our own calls
        out = model(input_ids=ids, **cache_kwargs(model, None))
        cache = output_cache(out)
        assert cache_length(cache) == 3
        out2 = model(input_ids=ids[:, -1:], **cache_kwargs(model, cache))
    assert cache_length(output_cache(out2)) == 4


def test_cache_found_under_any_keyword_or_position() -> None:
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 4)
    cache.update(k, k, 0)
    assert cache_length(cache) == 5
    assert find_cache_length((), {"cache": cache}) == 5
    assert find_cache_length((), {"past_key_values": cache}) == 5
    assert find_cache_length((), {"some_future_name": cache}) == 5
    assert find_cache_length((None, cache), {}) == 5
    legacy = ((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)),)
    assert find_cache_length((), {"past": legacy}) == 7
    assert find_cache_length((), {"input_ids": torch.zeros(1, 3)}) == 0
    assert cache_length(None) == 0


def test_our_generation_loops_raise_no_warning() -> None:
    model = attach_codebooks(tiny_model("gpt2"), CodebookConfig(num_codes=16, k=1))
    spec = InterventionSpec([EditSpec("layers.0.attn_heads", 3, positions="generated")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gens = generate(model, None, [1, 2, 3], max_new_tokens=5, spec=spec, stop_at_eos=False)
        fsm = TokFSM(FSMConfig(num_states=10, num_edges=3, seq_len=7))
        seqs = sample_sequences(tiny_model("gpt_neox", vocab=fsm.vocab_size), fsm, 2, seq_len=7)
    assert len(gens[0].ids) == 5
    assert tuple(seqs.shape) == (2, 7)


def test_hf_generate_positions_match_our_loop() -> None:
    """``model.generate`` (which passes the cache under this version's keyword) and our own
    loop put a 'generated' edit on exactly the same tokens."""
    model = attach_codebooks(tiny_model("llama"), CodebookConfig(num_codes=16, k=1))
    spec = InterventionSpec([EditSpec("layers.1.attn_heads", 5, positions="generated")])
    prompt = torch.tensor([[4, 5, 6]])
    with intervene(model, spec), model.record_codes() as rec:
        out = model.generate(
            prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
        )
    codes = rec["layers.1.attn_heads"][0, :, :, 0]  # (seq, heads)
    assert codes.shape[0] == 5  # the last sampled token is never run
    assert (codes[3:] == 5).all()
    assert not (codes[:3] == 5).all()
    ours = generate(
        model, None, [4, 5, 6], max_new_tokens=3, spec=spec, temperature=0, stop_at_eos=False
    )
    assert ours[0].ids == out[0, 3:].tolist()
