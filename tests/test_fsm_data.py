"""Tests for the TokFSM data and its metrics, on hand-made machines and models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from codebook_lens.experiments.fsm.data import (
    FSMConfig,
    TokFSM,
    first_transition_accuracy,
    first_transition_probs,
    next_state_probs,
    next_token_metrics,
    sample_sequences,
    transition_accuracy,
    transition_stats,
)


class PerfectModel(nn.Module):
    """A model that IS the machine: logits = log of the exact next-token distribution."""

    def __init__(self, fsm: TokFSM) -> None:
        super().__init__()
        self.fsm = fsm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # a dummy last token makes entry L-1 the distribution after all real tokens
        dummy = torch.zeros_like(input_ids[:, :1])
        padded = torch.cat([input_ids, dummy], dim=1)
        probs = self.fsm.optimal_next_token_probs(padded, strict=False)  # (B, L, V)
        return probs.clamp_min(1e-12).log()


class UniformModel(nn.Module):
    """A model that ignores its input: equal logits for every token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab_size)


def hand_fsm() -> TokFSM:
    """4 states in base 2 (digits 00, 01, 10, 11), 2 edges each."""
    edges = np.array([[1, 2], [0, 3], [2, 3], [0, 1]])
    return TokFSM(FSMConfig(num_states=4, num_edges=2, base=2, seq_len=9), edges=edges)


SMALL = FSMConfig(num_states=12, num_edges=3, base=3, seq_len=25, seed=3)


# ------------------------------------------------------------------------ config / machine
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_states": 1}, "num_states=1"),
        ({"num_edges": 0}, "num_edges=0"),
        ({"num_states": 5, "num_edges": 6}, "num_edges=6"),
        ({"base": 1}, "base=1"),
        ({"seq_len": 1}, "seq_len=1"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FSMConfig(**kwargs)


def test_bad_edges_raise() -> None:
    cfg = FSMConfig(num_states=3, num_edges=2, base=2)
    with pytest.raises(ValueError, match="distinct"):
        TokFSM(cfg, edges=np.array([[0, 0], [1, 2], [0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        TokFSM(cfg, edges=np.array([[0, 1, 2]] * 3))
    with pytest.raises(ValueError, match="state ids"):
        TokFSM(cfg, edges=np.array([[0, 3], [1, 2], [0, 1]]))


def test_machine_is_seeded_and_well_formed() -> None:
    a, b, c = TokFSM(FSMConfig(seed=1)), TokFSM(FSMConfig(seed=1)), TokFSM(FSMConfig(seed=2))
    assert np.array_equal(a.edges, b.edges)
    assert not np.array_equal(a.edges, c.edges)
    assert a.edges.shape == (100, 10)
    assert all(len(set(row)) == 10 for row in a.edges.tolist())
    assert a.edges.min() >= 0 and a.edges.max() < 100
    p = a.transition_matrix()
    assert p.shape == (100, 100)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert a.is_valid_transition(0, int(a.edges[0, 3]))
    missing = next(s for s in range(100) if s not in set(a.edges[0].tolist()))
    assert not a.is_valid_transition(0, missing)
    assert not a.is_valid_transition(0, 100) and not a.is_valid_transition(-1, 0)
    assert (a.vocab_size, a.bos_id, a.eos_id) == (12, 10, 11)
    assert a.floor_loss == pytest.approx(math.log(10) / 2)


@pytest.mark.parametrize(
    ("n", "base", "digits"),
    [(100, 10, 2), (101, 10, 3), (10, 10, 1), (2, 2, 1), (8, 2, 3), (9, 2, 4)],
)
def test_num_digits(n: int, base: int, digits: int) -> None:
    assert TokFSM(FSMConfig(num_states=n, num_edges=1, base=base)).num_digits == digits


def test_encode_decode_round_trip_and_invalid_groups() -> None:
    fsm = TokFSM()
    assert fsm.encode_states([7, 42, 99]).tolist() == [0, 7, 4, 2, 9, 9]
    states = torch.randint(100, (3, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fsm.decode_tokens(fsm.encode_states(states)), states)
    small = TokFSM(FSMConfig(num_states=50, num_edges=2))  # "73" is out of range
    assert small.decode_tokens([0, 7, 7, 3, fsm.bos_id, 1, 4]).tolist() == [7, -1, -1]
    with pytest.raises(ValueError, match="not a valid state"):
        small.decode_tokens([7, 3], strict=True)
    with pytest.raises(ValueError, match="states must be"):
        fsm.encode_states([100])


def test_sample_is_a_walk_and_deterministic() -> None:
    fsm = TokFSM(FSMConfig(seq_len=128))  # 63.5 states: the last one is cut
    tokens, states = fsm.sample_with_states(32, torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 128) and tokens.dtype == torch.long
    assert bool((tokens[:, 0] == fsm.bos_id).all())
    assert bool((tokens[:, 1:] < 10).all())
    assert states.shape == (32, 64)
    decoded = fsm.decode_tokens(tokens[:, 1:])
    assert torch.equal(decoded, states[:, :63])
    assert transition_stats(fsm, tokens)["transition_accuracy"] == 1.0
    again = fsm.sample(32, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    assert torch.equal(fsm.eval_set(8, seed=5), fsm.eval_set(8, seed=5))
    assert not torch.equal(fsm.eval_set(8, seed=5), fsm.eval_set(8, seed=6))
    assert fsm.state_end_positions().tolist()[:2] == [2, 4]
    assert int(fsm.state_end_positions()[-1]) == 126


def test_json_round_trip() -> None:
    fsm = TokFSM(SMALL)
    data = json.loads(json.dumps(fsm.to_json()))
    back = TokFSM.from_json(data)
    assert back.config == fsm.config
    assert np.array_equal(back.edges, fsm.edges)
    assert len(data["states"]) == 12 and data["num_digits"] == fsm.num_digits


def test_optimal_probs_by_hand() -> None:
    fsm = hand_fsm()
    # BOS, state 1 = (0, 1), state 3 = (1, 1), state 0 = (0, 0)
    tokens = torch.tensor([[2, 0, 1, 1, 1, 0, 0]])
    p = fsm.optimal_next_token_probs(tokens)  # (1, 6, 4)
    expected = [
        [0.5, 0.5, 0, 0],  # first digit of the start state: 2 of 4 states start with 0
        [0.5, 0.5, 0, 0],  # start state began with 0: 00 or 01
        [0.5, 0.5, 0, 0],  # successors of 1 = {0 (00), 3 (11)}
        [0.0, 1.0, 0, 0],  # started with 1: must be 3 (11)
        [1.0, 0.0, 0, 0],  # successors of 3 = {0 (00), 1 (01)}: first digit 0
        [0.5, 0.5, 0, 0],  # 00 or 01
    ]
    torch.testing.assert_close(p[0], torch.tensor(expected))
    with pytest.raises(ValueError, match="not a walk"):
        fsm.optimal_next_token_probs(torch.tensor([[2, 0, 1, 1, 0]]))  # 1 -> 2 (10) is no edge


# --------------------------------------------------------------------------------- metrics
def test_perfect_model_scores_perfectly() -> None:
    fsm = TokFSM(SMALL)
    model = PerfectModel(fsm)
    g = torch.Generator().manual_seed(0)
    assert transition_accuracy(model, fsm, num_samples=32, generator=g) == 1.0
    assert first_transition_accuracy(model, fsm) == pytest.approx(1.0, abs=1e-6)
    probs = first_transition_probs(model, fsm)
    torch.testing.assert_close(
        probs, torch.from_numpy(fsm.transition_matrix()).float(), atol=1e-6, rtol=0
    )
    m = next_token_metrics(model, fsm.eval_set(64), fsm)
    assert m["loss"] == pytest.approx(m["optimal_loss"], abs=1e-5)
    assert m["accuracy"] == pytest.approx(m["optimal_accuracy"])
    assert m["determined_accuracy"] == 1.0
    assert m["loss"] == pytest.approx(fsm.floor_loss, rel=0.2)


def test_perfect_model_on_default_machine() -> None:
    fsm = TokFSM()
    model = PerfectModel(fsm)
    assert first_transition_accuracy(model, fsm) == pytest.approx(1.0, abs=1e-6)
    tokens = sample_sequences(model, fsm, 16, torch.Generator().manual_seed(1), seq_len=41)
    assert transition_stats(fsm, tokens)["transition_accuracy"] == 1.0
    m = next_token_metrics(model, fsm.eval_set(32), fsm)
    assert m["loss"] == pytest.approx(fsm.floor_loss, abs=0.05)


def test_uniform_model_fails() -> None:
    fsm = TokFSM(SMALL)
    model = UniformModel(fsm.vocab_size)
    v, d = fsm.vocab_size, fsm.num_digits
    acc = transition_accuracy(
        model, fsm, num_samples=64, generator=torch.Generator().manual_seed(0)
    )
    assert acc < 0.2
    # every digit string gets (1/V)^d; E of them are right
    assert first_transition_accuracy(model, fsm) == pytest.approx(fsm.num_edges / v**d)
    m = next_token_metrics(model, fsm.eval_set(32), fsm)
    assert m["loss"] == pytest.approx(math.log(v))
    assert m["loss"] > m["optimal_loss"] + 0.5


def test_model_of_another_machine_fails() -> None:
    fsm = TokFSM(SMALL)
    other = PerfectModel(TokFSM(FSMConfig(**{**vars(SMALL), "seed": 99})))
    assert first_transition_accuracy(other, fsm) < 0.6
    acc = transition_accuracy(
        other, fsm, num_samples=32, generator=torch.Generator().manual_seed(0)
    )
    assert acc < 0.6


def test_next_state_probs_after_long_prefix() -> None:
    fsm = TokFSM(SMALL)
    tokens, states = fsm.sample_with_states(5, torch.Generator().manual_seed(2), seq_len=13)
    probs = next_state_probs(PerfectModel(fsm), fsm, tokens)  # 4 full states each
    expected = torch.from_numpy(fsm.transition_matrix()).float()[states[:, 3]]
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


def test_hf_model_cached_sampling_matches_uncached() -> None:
    transformers = pytest.importorskip("transformers")
    fsm = TokFSM(SMALL)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=fsm.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.train()
    cached = sample_sequences(model, fsm, 8, torch.Generator().manual_seed(0))
    uncached = sample_sequences(lambda x: model(x).logits, fsm, 8, torch.Generator().manual_seed(0))
    assert model.training  # the mode is restored
    assert torch.equal(cached, uncached)
    assert 0.0 <= first_transition_accuracy(model, fsm) <= 1.0


def test_bad_temperature() -> None:
    fsm = TokFSM(SMALL)
    with pytest.raises(ValueError, match="temperature=0"):
        sample_sequences(UniformModel(fsm.vocab_size), fsm, 2, temperature=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_codebook_model_cached_sampling_matches_uncached(arch: str) -> None:
    from codebook_lens import CodebookConfig, attach_codebooks
    from codebook_lens.experiments.fsm import data as fsm_data

    transformers = pytest.importorskip("transformers")
    fsm = TokFSM(SMALL)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=fsm.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64)  # fmt: skip
    else:
        cfg = transformers.GPTNeoXConfig(vocab_size=fsm.vocab_size, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = attach_codebooks(
        transformers.AutoModelForCausalLM.from_config(cfg),
        CodebookConfig(num_codes=16, k=1, placements=["attn_heads", "mlp_out"]),
    )
    model.eval()  # the uncached lambda below is not put in eval mode (GPT-2 has dropout)
    assert fsm_data._accepts_cache(model)  # the wrapped HF model takes the cache
    cached = sample_sequences(model, fsm, 8, torch.Generator().manual_seed(0))
    uncached = sample_sequences(lambda x: model(input_ids=x).logits, fsm, 8,
                                torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(cached, uncached)
