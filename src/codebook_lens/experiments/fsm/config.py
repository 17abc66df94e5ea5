"""The FSM demo's settings (``DemoConfig``) and the names of its patch groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from codebook_lens.config import check_choice
from codebook_lens.experiments.fsm.data import FSMConfig, MachineShape
from codebook_lens.model.config import CodebookConfig
from codebook_lens.training.base_models import ModelConfig

PatchGroup = Literal["none", "attn", "mlp", "all"]
PATCH_GROUPS: tuple[PatchGroup, ...] = ("none", "attn", "mlp", "all")
PatchScope = Literal["transition", "last"]


@dataclass
class DemoConfig(MachineShape):
    """Every setting of the FSM demo (the defaults reproduce the paper's setup on a CPU); the
    machine's shape (``num_states``, ``num_edges``, ``base``) comes from ``MachineShape``."""

    seq_len: int = 65
    """Training sequence length in tokens including BOS (BOS + 32 two-digit states)."""
    fsm_seed: int = 0
    """Seed of the random machine."""

    arch: Literal["gpt2", "gpt_neox", "llama"] = "gpt2"
    """Hugging Face architecture of the transformer, built from a config."""
    layers: int = 2
    """Transformer blocks."""
    width: int = 64
    """Residual width (fewer dimensions than FSM states: the superposition regime)."""
    heads: int = 4
    """Attention heads."""
    mlp_width: int = 256
    """MLP hidden width."""
    rotary_fraction: float = 1.0
    """gpt_neox only: fraction of each head's dimensions with rotary positions (HF's and the
    reference's default is 0.25; full rotary learns the previous-token heads far sooner)."""
    rotary_scale: float = 1.0
    """gpt_neox and llama: every rotary frequency times this (HF's linear RoPE scaling, factor
    1/scale). Rotary positions are relative only; at pi the fastest frequency has a period of
    2 tokens, which lets attention tell a state's first digit from its second."""

    base_steps: int = 3000
    """Most optimizer steps for the base model (fewer once the stop criterion holds)."""
    base_lr: float = 3e-3
    """Peak learning rate of the base model."""
    batch_size: int = 32
    """Sequences per step (small batches: this task is limited by the number of updates)."""
    warmup_steps: int = 30
    """Linear warmup steps of the codebook stage (and of the base stage when
    ``base_warmup_steps`` is None)."""
    base_warmup_steps: int | None = 300
    """Linear warmup steps of the base stage (None: ``warmup_steps``). Measured on development
    seeds (docs/fsm.md): 300 instead of 30 leaves chance as early and reaches the criterion
    sooner and more often within the cap."""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate decay after the warmup (both stages; over each stage's step cap). Constant:
    the stages stop on a criterion, not at the cap (measured: cosine over 1,500 steps gave no
    better base model than constant)."""

    num_codes: int = 1000
    """Codes per codebook C (per head for attention codebooks)."""
    k: int = 1
    """Codes per token (and head)."""
    codebook_steps: int = 1500
    """Most fine-tuning steps of the codebook model (initialised from the base model), warm-up
    included (fewer once the stop criterion holds)."""
    codebook_warmup_steps: int = 0
    """Train the codebooks only (model frozen, constant LR) for this many of the fine-tuning
    steps before joint training. Off by default: measured at seeds 0 and 1 it did not help
    (seed 0: 92% -> 80% pure states at the same accuracy; seed 1: 92.5% -> 91.6% transition
    accuracy), though one separate fine-tune of a longer-trained base gained from it."""
    codebook_lr: float = 0.1
    """Peak learning rate of the codebooks. High, so that codes keep up with the activations:
    from the same base, 600 steps reached 92% transition accuracy at 3e-3, 98% at 3e-2, and 0.1
    had 98% of states pure at 500 steps (93% at 3e-2)."""
    model_lr_factor: float = 0.01
    """The transformer's learning rate during fine-tuning, as a fraction of codebook_lr (1e-3 at
    the defaults; 3e-3 was slower and a factor 1.0 at codebook_lr 3e-3 diverged)."""
    commitment_weight: float = 1.0
    """Pulls each codebook's input toward its chosen code. Without it the straight-through
    gradient lets activations drift away from the codes and joint fine-tuning diverges."""
    layer_norm: bool = False
    """LayerNorm each codebook's input before choosing and reconstructing (the codes live on the
    normalised scale, so the transformer cannot inflate the quantisation error by growing its
    activations)."""
    dead_code_steps: int = 0
    """Revive codes unused for this many steps (0: never). Off by default here: every revival
    splits a state's activations between two near-identical codes, which destroys the
    one-code-per-state structure the demo measures (measured: 95% -> 35% pure states)."""

    check_every: int = 100
    """Every this many steps each stage measures itself on validation data (sequences that the
    report does not use) and stops once converged; 0: train to the step caps."""
    base_target: float = 0.97
    """The base stage stops once its validation transition accuracy reaches this (the codebook
    stage trains the transformer further, at a lower learning rate)."""
    codebook_gap: float = 0.01
    """The codebook stage stops once its validation transition accuracy is within this of the
    base model's (and its pure-state fraction is stable, see purity_tolerance)."""
    purity_tolerance: float = 0.02
    """Stable = the fraction of states with a pure MLP code moved by at most this since the
    previous check."""
    check_sequences: int = 64
    """Sequences sampled from BOS at each check (and validation sequences for purity: 2x)."""
    base_gate: bool = True
    """Train codebooks only on a base model that met ``base_target`` within its cap (restarts
    included); otherwise the run stops after the base stage and says why. Needs
    ``check_every`` > 0 (without checks there is no criterion to meet)."""
    max_restarts: int = 2
    """Restart a stalled base stage (see stall_steps) with a fresh initialisation at most this
    many times; each attempt has the whole ``base_steps`` cap."""
    stall_steps: int = 800
    """The base stage counts as stalled once its validation transition accuracy has stayed
    below ``stall_chance`` for this many steps, or gained less than ``stall_gain`` over the
    last this many steps while more than ``stall_below`` under ``base_target``; 0: never."""
    stall_chance: float = 0.2
    """Transition accuracy below this counts as chance (a model that ignores the previous
    state scores about 1/E)."""
    stall_gain: float = 0.01
    """Least gain of the best transition accuracy over ``stall_steps`` that counts as progress."""
    stall_below: float = 0.05
    """A plateau this far under ``base_target`` counts as a stall (closer, the stage goes on)."""

    eval_sequences: int = 256
    """Held-out sequences for loss / accuracy and for the state-code tables."""
    transition_samples: int = 256
    """Sequences sampled from BOS for the transition accuracy."""
    intervention_pairs: int = 300
    """Random (a, b) state pairs for the patching experiment."""
    intervention_prefix_states: int = 8
    """States in each patched sequence (the patch is at its last token)."""
    purity_threshold: float = 0.9
    """Precision and recall a code (or neuron) needs to count as a pure state detector."""
    seed: int = 0
    """Seed of training, sampling and pair choice."""
    threads: int = 0
    """torch CPU threads; 0 uses the cores no other process is using, re-checked while it runs
    (``codebook_lens.threads``)."""

    def __post_init__(self) -> None:
        FSMConfig(self.num_states, self.num_edges, self.base, self.seq_len, self.fsm_seed)
        check_choice("arch", self.arch, ("gpt2", "gpt_neox", "llama"))
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        for name in (
            "layers", "width", "heads", "mlp_width", "base_steps", "batch_size", "num_codes",
            "k", "codebook_steps", "eval_sequences", "transition_samples", "intervention_pairs",
            "intervention_prefix_states", "check_sequences",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        for name in ("check_every", "threads", "max_restarts", "stall_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 0")
        for name in ("base_target", "codebook_gap", "purity_tolerance", "stall_chance",
                     "stall_gain", "stall_below"):  # fmt: skip
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; it must be in [0, 1]")
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is invalid for heads={self.heads}: it must divide evenly"
            )
        if self.base_warmup_steps is not None and (
            isinstance(self.base_warmup_steps, bool)
            or not isinstance(self.base_warmup_steps, int)
            or self.base_warmup_steps < 0
        ):
            raise ValueError(
                f"base_warmup_steps={self.base_warmup_steps!r} is invalid; it must be an integer "
                ">= 0 or None (use warmup_steps)"
            )
        if not 0 <= self.codebook_warmup_steps < self.codebook_steps:
            raise ValueError(
                f"codebook_warmup_steps={self.codebook_warmup_steps} is invalid; it must be an "
                f"integer in [0, codebook_steps={self.codebook_steps})"
            )
        if self.k > self.num_codes:
            raise ValueError(f"k={self.k} is invalid; it must be <= num_codes={self.num_codes}")
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if not 0 < self.rotary_scale <= 4:
            raise ValueError(f"rotary_scale={self.rotary_scale} must be in (0, 4]")
        if not 0 < self.purity_threshold <= 1:
            raise ValueError(f"purity_threshold={self.purity_threshold} must be in (0, 1]")
        self.codebook_config()  # checks commitment_weight, dead_code_steps, ... up front

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A tiny run for tests and smoke checks (about a minute on 2 cores; its base stage is
        too short to meet the criterion, so the gate is off)."""
        values: dict[str, Any] = dict(
            num_states=12, num_edges=3, seq_len=33, layers=2, width=64, heads=4, mlp_width=128,
            base_steps=40, batch_size=32, warmup_steps=5, num_codes=64, codebook_steps=30,
            eval_sequences=48, transition_samples=24, intervention_pairs=24,
            intervention_prefix_states=4, dead_code_steps=10, codebook_warmup_steps=10,
            check_every=20, check_sequences=16, base_gate=False, base_warmup_steps=None,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def model_config(self) -> ModelConfig:
        """The transformer (its context also fits the patching experiment's sequences)."""
        return ModelConfig(
            arch=self.arch, num_layers=self.layers, width=self.width, heads=self.heads,
            mlp_width=self.mlp_width, context=max(self.seq_len, 2 * self.intervention_prefix_states + 3),
            rotary_fraction=self.rotary_fraction if self.arch == "gpt_neox" else None,
            rotary_scale=self.rotary_scale, tie_embeddings=self.arch == "gpt2",
        )  # fmt: skip

    def fsm_config(self) -> FSMConfig:
        return FSMConfig(self.num_states, self.num_edges, self.base, self.seq_len, self.fsm_seed)

    def codebook_config(self) -> CodebookConfig:
        return CodebookConfig(
            num_codes=self.num_codes,
            k=self.k,
            placements=["attn_heads", "mlp_out"],
            kmeans_init=True,
            commitment_weight=self.commitment_weight,
            layer_norm=self.layer_norm,
            dead_code_steps=self.dead_code_steps,
            seed=self.seed,
        )
