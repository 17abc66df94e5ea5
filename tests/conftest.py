"""Shared fixtures: tiny random models of the three architectures, built locally."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

ARCHS = ("gpt2", "gpt_neox", "llama")


def tiny_model(arch: str, *, vocab: int = 64, layers: int = 2, width: int = 32, heads: int = 4):
    """A tiny randomly initialised causal LM of the given architecture (seeded)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            vocab_size=vocab,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=width * 4,
            vocab_size=vocab,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=width * 2,
            vocab_size=vocab,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def has_cuda() -> bool:
    return torch.cuda.is_available()
