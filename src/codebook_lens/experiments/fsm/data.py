"""TokFSM: random finite-state machines written as digit tokens, and metrics for models on them.

A machine has ``num_states`` states; each state has ``num_edges`` out-edges to distinct states
(drawn uniformly without replacement, self-loops allowed), each taken with probability
``1 / num_edges``. A sequence is ``BOS`` followed by a random walk from a uniform random start
state, each state written as its zero-padded base-``base`` digits, one token per digit.

Token ids: digits ``0 .. base-1``, ``BOS = base``, ``EOS = base + 1`` (vocabulary ``base + 2``).

The metric functions take any model that maps ``input_ids`` of shape ``(batch, seq)`` to logits
of shape ``(batch, seq, vocab)``, either directly or as ``.logits`` (a Hugging Face causal LM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from codebook_lens.model.kv_cache import cache_kwargs, output_cache

ModelLike = Callable[..., Any]
"""A callable ``model(input_ids) -> logits`` or ``-> output with .logits`` (HF causal LM)."""


@dataclass
class MachineShape:
    """The size of a TokFSM task and how its sequences are written."""

    num_states: int = 100
    """Number of states N (at least 2)."""
    num_edges: int = 10
    """Out-edges per state E, each taken with probability 1/E (1 <= E <= N)."""
    base: int = 10
    """Base b in which states are written; one token per digit (at least 2)."""
    seq_len: int = 129
    """Tokens per sequence including BOS (default: BOS + 64 two-digit states)."""

    def __post_init__(self) -> None:
        if self.num_states < 2:
            raise ValueError(f"num_states={self.num_states} is invalid; it must be >= 2")
        if not 1 <= self.num_edges <= self.num_states:
            raise ValueError(
                f"num_edges={self.num_edges} is invalid; it must be between 1 and "
                f"num_states={self.num_states}"
            )
        if self.base < 2:
            raise ValueError(f"base={self.base} is invalid; it must be >= 2")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} is invalid; it must be >= 2 (BOS + 1 digit)")


@dataclass
class FSMConfig(MachineShape):
    """Options of a TokFSM task: its shape and the seed of its random edges."""

    seed: int = 0
    """Seed of the random machine (edges)."""


class TokFSM:
    """A seeded random finite-state machine and its digit-token sequences.

    Attributes:
        config: the options.
        edges: ``(num_states, num_edges)`` int64 numpy array; row ``s`` lists the successors of
            ``s`` in increasing order.
        num_digits: digits per state, enough to write ``num_states - 1`` in base ``base``.
        digit_table: ``(num_states, num_digits)`` int64 numpy array, the digits of each state.
    """

    def __init__(self, config: FSMConfig | None = None, edges: np.ndarray | None = None) -> None:
        self.config = config if config is not None else FSMConfig()
        n, e, b = self.config.num_states, self.config.num_edges, self.config.base
        if edges is None:
            rng = np.random.default_rng(self.config.seed)
            edges = np.stack([np.sort(rng.choice(n, size=e, replace=False)) for _ in range(n)])
        edges = np.asarray(edges, dtype=np.int64)
        if edges.shape != (n, e):
            raise ValueError(
                f"edges has shape {edges.shape}; expected (num_states, num_edges)={(n, e)}"
            )
        if edges.min() < 0 or edges.max() >= n:
            raise ValueError(f"edges must be state ids in [0, {n - 1}]")
        if any(len(set(row.tolist())) != e for row in edges):
            raise ValueError("edges: the successors of each state must be distinct")
        self.edges = edges

        num_digits = 1
        while b**num_digits < n:
            num_digits += 1
        self.num_digits = num_digits
        powers = b ** np.arange(num_digits - 1, -1, -1, dtype=np.int64)  # most significant first
        self.digit_table = (np.arange(n, dtype=np.int64)[:, None] // powers) % b
        self._powers = powers
        self._edges_t = torch.from_numpy(self.edges)
        self._digits_t = torch.from_numpy(self.digit_table)

    # ----------------------------------------------------------------- basic properties
    @property
    def num_states(self) -> int:
        """N."""
        return self.config.num_states

    @property
    def num_edges(self) -> int:
        """E."""
        return self.config.num_edges

    @property
    def bos_id(self) -> int:
        """Token id of BOS (``base``)."""
        return self.config.base

    @property
    def eos_id(self) -> int:
        """Token id of EOS (``base + 1``)."""
        return self.config.base + 1

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``base + 2``)."""
        return self.config.base + 2

    @property
    def seq_len(self) -> int:
        """Tokens per sampled sequence, BOS included."""
        return self.config.seq_len

    @property
    def floor_loss(self) -> float:
        """Asymptotic best next-token loss (nats/token): ``ln(E) / num_digits``.

        Each state choice carries ``ln E`` nats spread over its digit tokens; the first state of
        a sequence (``ln N``) is ignored, so finite sequences have a slightly higher optimum (see
        :meth:`optimal_next_token_probs`).
        """
        return math.log(self.num_edges) / self.num_digits

    def successors(self, state: int) -> list[int]:
        """The successor states of ``state``, in increasing order."""
        return self.edges[state].tolist()

    def is_valid_transition(self, a: int, b: int) -> bool:
        """Whether ``a -> b`` is an edge of the machine (False for out-of-range ids)."""
        if not (0 <= a < self.num_states and 0 <= b < self.num_states):
            return False
        return bool(np.any(self.edges[a] == b))

    def transition_matrix(self) -> np.ndarray:
        """``(N, N)`` float64 matrix ``P[a, b]`` = probability of moving from ``a`` to ``b``."""
        p = np.zeros((self.num_states, self.num_states), dtype=np.float64)
        np.put_along_axis(p, self.edges, 1.0 / self.num_edges, axis=1)
        return p

    def adjacency(self) -> torch.Tensor:
        """``(N, N)`` bool tensor, True where ``a -> b`` is an edge."""
        adj = torch.zeros(self.num_states, self.num_states, dtype=torch.bool)
        adj.scatter_(1, self._edges_t, True)
        return adj

    # ---------------------------------------------------------------- encode / decode
    def encode_states(self, states: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Digit tokens of states, no BOS: ``(..., T)`` states -> ``(..., T * num_digits)``."""
        s = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states)
        s = s.long()
        if s.numel() and (s.min() < 0 or s.max() >= self.num_states):
            raise ValueError(f"states must be in [0, {self.num_states - 1}]")
        return self._digits_t[s].flatten(-2) if s.dim() else self._digits_t[s]

    def decode_tokens(
        self, tokens: Sequence[int] | np.ndarray | torch.Tensor, strict: bool = False
    ) -> torch.Tensor:
        """States written by digit tokens (no BOS): ``(..., L)`` -> ``(..., L // num_digits)``.

        A group of ``num_digits`` tokens that holds a non-digit token or writes a number
        ``>= num_states`` decodes to ``-1`` (or raises ``ValueError`` when ``strict``). A trailing
        incomplete group is dropped.
        """
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        t = t.long()
        d = self.num_digits
        n_groups = t.shape[-1] // d
        groups = t[..., : n_groups * d].unflatten(-1, (n_groups, d))  # (..., n_groups, d)
        is_digit = (groups >= 0) & (groups < self.config.base)
        value = (groups.clamp(0, self.config.base - 1) * torch.from_numpy(self._powers)).sum(-1)
        valid = is_digit.all(-1) & (value < self.num_states)
        if strict and not bool(valid.all()):
            raise ValueError("tokens hold a group that is not a valid state")
        return torch.where(valid, value, torch.full_like(value, -1))

    def state_end_positions(self, seq_len: int | None = None) -> torch.Tensor:
        """Positions (BOS = 0) of the last digit of each complete state of a sequence.

        Returns ``(num_complete_states,)``; at those positions the current state is known.
        """
        length = self.seq_len if seq_len is None else seq_len
        n_states = (length - 1) // self.num_digits
        return torch.arange(1, n_states + 1) * self.num_digits

    # ---------------------------------------------------------------------- sampling
    def sample_with_states(
        self, batch: int, generator: torch.Generator | None = None, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample random walks.

        Returns ``tokens`` ``(batch, seq_len)`` int64 (BOS + digits) and ``states``
        ``(batch, ceil((seq_len - 1) / num_digits))`` int64, the walk (the last state may be
        only partly written).
        """
        length = self.seq_len if seq_len is None else seq_len
        n_states = -(-(length - 1) // self.num_digits)
        states = torch.empty(batch, n_states, dtype=torch.long)
        states[:, 0] = torch.randint(self.num_states, (batch,), generator=generator)
        if n_states > 1:
            choices = torch.randint(self.num_edges, (batch, n_states - 1), generator=generator)
            for i in range(1, n_states):
                states[:, i] = self._edges_t[states[:, i - 1], choices[:, i - 1]]
        digits = self._digits_t[states].flatten(1)[:, : length - 1]  # (batch, seq_len - 1)
        bos = torch.full((batch, 1), self.bos_id, dtype=torch.long)
        return torch.cat([bos, digits], dim=1), states

    def sample(
        self, batch: int, generator: torch.Generator | None = None, seq_len: int | None = None
    ) -> torch.Tensor:
        """A training batch: ``(batch, seq_len)`` int64 tokens, BOS + a random walk's digits."""
        return self.sample_with_states(batch, generator, seq_len)[0]

    def eval_set(self, n: int, seed: int = 1234, seq_len: int | None = None) -> torch.Tensor:
        """A fixed evaluation set: ``(n, seq_len)`` tokens, the same for the same machine/seed."""
        return self.sample(n, torch.Generator().manual_seed(seed), seq_len)

    # ------------------------------------------------------------ Bayes-optimal model
    def optimal_next_token_probs(self, tokens: torch.Tensor, strict: bool = True) -> torch.Tensor:
        """Exact next-token distribution given the machine: ``(B, L)`` -> ``(B, L - 1, vocab)``.

        Entry ``[:, t]`` is the distribution of ``tokens[:, t + 1]`` given ``tokens[:, : t + 1]``
        (the first token is taken to be BOS). With ``strict``, ``tokens`` must be walks of the
        machine (else ``ValueError``); otherwise a context that no walk produces gets a uniform
        distribution over the vocabulary.
        """
        tokens = tokens.long()
        bsz, length = tokens.shape
        d, v = self.num_digits, self.vocab_size
        digits = tokens[:, 1:]  # (B, P); prediction t is digits[:, t]
        p_len = length - 1
        n_full = p_len // d
        states = self.decode_tokens(digits[:, : n_full * d], strict=strict)  # (B, n_full)
        pos = torch.arange(p_len)
        succ_digits = self._digits_t[self._edges_t]  # (N, E, d)
        probs = torch.zeros(bsz, p_len, v)
        for j in range(d):
            at_j = pos[pos % d == j]
            group = at_j // d
            for first in (True, False):
                sel = at_j[group == 0] if first else at_j[group > 0]
                if sel.numel() == 0:
                    continue
                if first:  # the start state: uniform over all states
                    cand = self._digits_t[None, None].expand(bsz, sel.numel(), -1, -1)
                else:
                    prev = states[:, sel // d - 1]  # (B, R), -1 where invalid
                    cand = succ_digits[prev.clamp(min=0)]  # (B, R, E, d)
                mask = torch.ones(cand.shape[:-1])
                if not first:
                    mask = mask * (prev >= 0)[..., None]
                if j > 0:
                    prefix = digits[:, sel[:, None] - j + torch.arange(j)]  # (B, R, j)
                    mask = mask * (cand[..., :j] == prefix[:, :, None, :]).all(-1)
                counts = torch.zeros(bsz, sel.numel(), v).scatter_add_(2, cand[..., j], mask)
                total = counts.sum(-1, keepdim=True)
                impossible = total == 0
                if strict and bool(impossible.any()):
                    raise ValueError("tokens are not a walk of this machine")
                counts = torch.where(impossible, torch.ones_like(counts), counts)
                probs[:, sel] = counts / counts.sum(-1, keepdim=True)
        if strict and bool((probs.gather(-1, digits[..., None]) == 0).any()):
            raise ValueError("tokens are not a walk of this machine")
        return probs

    # ----------------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the config, the digits per state, the token ids and the edges."""
        return {
            "config": asdict(self.config),
            "num_digits": self.num_digits,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            "states": list(range(self.num_states)),
            "edges": self.edges.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokFSM:
        """Rebuild a machine from :meth:`to_json` output (the stored edges are used as is)."""
        return cls(FSMConfig(**data["config"]), edges=np.asarray(data["edges"], dtype=np.int64))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TokFSM(num_states={c.num_states}, num_edges={c.num_edges}, base={c.base}, "
            f"seq_len={c.seq_len}, seed={c.seed})"
        )


# ============================================================================ metrics
def _logits(model: ModelLike, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` -> ``(B, L, vocab)`` float logits from a callable or an HF causal LM."""
    out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def _device(model: ModelLike) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class _EvalMode:
    """Context: ``model.eval()`` and ``torch.no_grad()``, training flag restored on exit."""

    def __init__(self, model: ModelLike) -> None:
        self.model = model
        self.was_training = isinstance(model, nn.Module) and model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        if isinstance(self.model, nn.Module):
            self.model.train(self.was_training)


def next_token_metrics(
    model: ModelLike,
    tokens: torch.Tensor,
    fsm: TokFSM | None = None,
    batch_size: int = 128,
) -> dict[str, float]:
    """Next-token loss (nats/token) and accuracy of ``model`` on ``tokens`` ``(B, L)``.

    Always: ``loss`` and ``accuracy`` over all ``L - 1`` predicted positions. With ``fsm``, also
    ``determined_*`` (positions whose next token is fixed by the machine, e.g. a state's last
    digit when no two successors share the leading digits), ``undetermined_*``, the Bayes-optimal
    ``optimal_loss`` / ``optimal_accuracy`` on the same tokens, ``floor_loss`` (``ln(E) /
    num_digits``) and ``determined_fraction``.
    """
    device = _device(model)
    losses, correct, opt_losses, opt_correct, determined = [], [], [], [], []
    with _EvalMode(model):
        for start in range(0, tokens.shape[0], batch_size):
            x = tokens[start : start + batch_size].long()
            logits = _logits(model, x.to(device))[:, :-1].cpu()  # (b, L-1, V)
            target = x[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            losses.append(-logp.gather(-1, target[..., None])[..., 0])
            correct.append(logits.argmax(-1) == target)
            if fsm is not None:
                opt = fsm.optimal_next_token_probs(x)
                opt_losses.append(-opt.gather(-1, target[..., None])[..., 0].log())
                opt_correct.append(opt.argmax(-1) == target)
                determined.append(opt.max(-1).values > 1 - 1e-6)
    loss_t, corr_t = torch.cat(losses), torch.cat(correct).float()
    result = {"loss": loss_t.mean().item(), "accuracy": corr_t.mean().item()}
    if fsm is not None:
        det = torch.cat(determined)
        result.update(
            optimal_loss=torch.cat(opt_losses).mean().item(),
            optimal_accuracy=torch.cat(opt_correct).float().mean().item(),
            floor_loss=fsm.floor_loss,
            determined_fraction=det.float().mean().item(),
        )
        for name, m in (("determined", det), ("undetermined", ~det)):
            if bool(m.any()):
                result[f"{name}_loss"] = loss_t[m].mean().item()
                result[f"{name}_accuracy"] = corr_t[m].mean().item()
    return result


def sample_sequences(
    model: ModelLike,
    fsm: TokFSM,
    num_samples: int,
    generator: torch.Generator | None = None,
    seq_len: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Sample ``(num_samples, seq_len)`` tokens from ``model`` starting from BOS.

    Hugging Face models (``PreTrainedModel``s, whose call takes a KV cache) and codebook models
    wrapping one are sampled with a KV cache; other callables are re-run on the whole prefix at
    each step.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid; it must be > 0")
    length = fsm.seq_len if seq_len is None else seq_len
    device = _device(model)
    use_cache = _accepts_cache(model)
    chunks = []
    with _EvalMode(model):
        for start in range(0, num_samples, batch_size):
            b = min(batch_size, num_samples - start)
            seq = torch.full((b, 1), fsm.bos_id, dtype=torch.long, device=device)
            past = None
            for _ in range(length - 1):
                if use_cache:
                    inp = seq if past is None else seq[:, -1:]
                    out = model(inp, **cache_kwargs(model, past))
                    past = output_cache(out)
                    logits = out.logits[:, -1].float()
                else:
                    logits = _logits(model, seq)[:, -1]
                probs = torch.softmax(logits.cpu() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
                seq = torch.cat([seq, nxt.to(device)], dim=1)
            chunks.append(seq.cpu())
    return torch.cat(chunks)


def _accepts_cache(model: ModelLike) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    # A CodebookModel forwards the cache to its wrapped HF model; its hooks quantize only the
    # new positions, so cached sampling gives the same codes as re-running the prefix.
    return isinstance(model, PreTrainedModel) or isinstance(
        getattr(model, "base", None), PreTrainedModel
    )


def transition_stats(fsm: TokFSM, tokens: torch.Tensor) -> dict[str, float]:
    """Score sampled sequences ``(B, L)`` (BOS first): consecutive state pairs that are edges.

    Returns ``transition_accuracy`` (pairs with both states valid and ``a -> b`` an edge, over
    all pairs), ``valid_state_fraction`` and ``num_pairs``. Invalid digit groups count as wrong.
    """
    states = fsm.decode_tokens(tokens[:, 1:])  # (B, S), -1 = invalid
    if states.shape[1] < 2:
        raise ValueError("sequences are too short to hold a transition")
    a, b = states[:, :-1], states[:, 1:]
    ok = (a >= 0) & (b >= 0)
    adj = fsm.adjacency()
    edge = adj[a.clamp(min=0), b.clamp(min=0)] & ok
    return {
        "transition_accuracy": edge.float().mean().item(),
        "valid_state_fraction": (states >= 0).float().mean().item(),
        "num_pairs": float(edge.numel()),
    }


def transition_accuracy(
    model: ModelLike,
    fsm: TokFSM,
    num_samples: int = 256,
    generator: torch.Generator | None = None,
    seq_len: int | None = None,
    temperature: float = 1.0,
) -> float:
    """Fraction of consecutive state pairs in sequences sampled from BOS that are real edges."""
    tokens = sample_sequences(model, fsm, num_samples, generator, seq_len, temperature)
    return transition_stats(fsm, tokens)["transition_accuracy"]


def next_state_probs(
    model: ModelLike, fsm: TokFSM, prefixes: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """Exact probability of each complete next state after each prefix: ``(B, L)`` -> ``(B, N)``.

    Each prefix must end at a state boundary. ``P(next = s)`` chains the model's digit
    probabilities; for digit ``j`` the model runs once per distinct ``j``-digit prefix of the
    states, so the cost is ``B * (1 + #distinct 1-digit prefixes + ...)`` forwards. Rows can sum
    to less than 1: mass on non-digit tokens and out-of-range numbers is lost.
    """
    prefixes = prefixes.long()
    bsz, _ = prefixes.shape
    device = _device(model)
    logp = torch.zeros(bsz, fsm.num_states)
    with _EvalMode(model):
        for j in range(fsm.num_digits):
            heads, index = np.unique(fsm.digit_table[:, :j], axis=0, return_inverse=True)
            heads_t = torch.from_numpy(heads).long()  # (H, j)
            n_heads = heads_t.shape[0]
            inputs = torch.cat(
                [
                    prefixes[:, None, :].expand(-1, n_heads, -1),
                    heads_t[None].expand(bsz, -1, -1),
                ],
                dim=2,
            ).flatten(0, 1)  # (B * H, L + j)
            rows = []
            for start in range(0, inputs.shape[0], batch_size):
                chunk = inputs[start : start + batch_size].to(device)
                rows.append(torch.log_softmax(_logits(model, chunk)[:, -1].cpu(), dim=-1))
            lp = torch.cat(rows).unflatten(0, (bsz, n_heads))  # (B, H, V)
            idx = torch.from_numpy(np.asarray(index).reshape(-1)).long()
            digit = torch.from_numpy(fsm.digit_table[:, j]).long()
            logp += lp[:, idx, digit]
    return logp.exp()


def first_transition_probs(model: ModelLike, fsm: TokFSM) -> torch.Tensor:
    """``(N, N)``: row ``s`` is the model's next-state distribution after ``BOS + digits(s)``."""
    states = torch.arange(fsm.num_states)
    bos = torch.full((fsm.num_states, 1), fsm.bos_id, dtype=torch.long)
    prefixes = torch.cat([bos, fsm.encode_states(states[:, None])], dim=1)
    return next_state_probs(model, fsm, prefixes)


def first_transition_accuracy(model: ModelLike, fsm: TokFSM) -> float:
    """Mean over states ``s`` of the probability mass the model puts on ``s``'s successors.

    Exact (no sampling): see :func:`first_transition_probs`.
    """
    probs = first_transition_probs(model, fsm)
    return (probs * fsm.adjacency().float()).sum(-1).mean().item()
