"""The FSM demo's settings (``DemoConfig``) and the names of its patch groups."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from codebook_lens.config import flat_names
from codebook_lens.experiments.fsm.data import FSMConfig, MachineShape
from codebook_lens.model.config import CodebookConfig
from codebook_lens.training.base_models import ModelConfig
from codebook_lens.training.loop import TrainConfig

PatchGroup = Literal["none", "attn", "mlp", "all"]
PATCH_GROUPS: tuple[PatchGroup, ...] = ("none", "attn", "mlp", "all")
PatchScope = Literal["transition", "last"]


_DEMO_TRAINING: dict[str, Any] = dict(
    weight_decay=0.0, beta2=0.99, min_lr_ratio=0.05, eval_every=0, checkpoint_every=0, device="cpu"
)


@flat_names(
    lm=("arch", "width", "heads", "mlp_width", "rotary_fraction", "rotary_scale"),
    codebooks=("num_codes", "k", "commitment_weight", "layer_norm", "dead_code_steps"),
    layers="lm.num_layers",
    base_steps="base_training.steps",
    base_lr="base_training.lr",
    base_warmup_steps="base_training.warmup_steps",
    batch_size=("base_training.batch_size", "codebook_training.batch_size"),
    schedule=("base_training.schedule", "codebook_training.schedule"),
    codebook_steps="codebook_training.steps",
    codebook_lr="codebook_training.lr",
    model_lr_factor="codebook_training.model_lr_factor",
    warmup_steps="codebook_training.warmup_steps",
)
@dataclass
class DemoConfig(MachineShape):
    """Every setting of the FSM demo (the defaults reproduce the paper's setup on a CPU); the
    machine's shape (``num_states``, ``num_edges``, ``base``) comes from ``MachineShape``."""

    seq_len: int = 65
    """Training sequence length in tokens including BOS (BOS + 32 two-digit states)."""
    fsm_seed: int = 0
    """Seed of the random machine."""

    lm: ModelConfig = field(default_factory=lambda: ModelConfig(
        arch="gpt2", num_layers=2, width=64, heads=4, mlp_width=256, rotary_fraction=1.0))  # fmt: skip
    """The transformer, built from a transformers config: a residual width below the number of
    FSM states (the superposition regime). Its context fits the training and patching
    sequences, embeddings are tied for gpt2 only, and ``rotary_fraction`` applies to gpt_neox
    only: full rotary (HF's and the reference's default is 0.25) learns the previous-token
    heads far sooner. ``rotary_scale`` pi gives the fastest frequency a period of 2 tokens,
    which lets attention tell a state's first digit from its second."""
    base_training: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, lr=3e-3, model_lr_factor=1.0, batch_size=32, warmup_steps=300,
        schedule="constant", **_DEMO_TRAINING))  # fmt: skip
    """The base stage: ``steps`` is its cap (it stops once the criterion holds), small batches
    (this task is limited by the number of updates). Warmup 300, not 30: measured on
    development seeds (docs/fsm.md) it leaves chance as early and reaches the criterion sooner
    and more often within the cap. A constant schedule, because the stages stop on a criterion,
    not at the cap (cosine over 1,500 steps gave no better base model)."""
    codebook_training: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, lr=0.1, model_lr_factor=0.01, batch_size=32, warmup_steps=30,
        schedule="constant", **_DEMO_TRAINING))  # fmt: skip
    """The codebook stage, fine-tuned from the base model: ``steps`` is its cap, warm-up
    included. ``lr`` is the codebooks' peak, high so that codes keep up with the activations
    (from the same base, 600 steps reached 92% transition accuracy at 3e-3, 98% at 3e-2, and
    0.1 had 98% of states pure at 500 steps, 93% at 3e-2); the transformer trains at
    ``model_lr_factor`` x that (3e-3 was slower; a factor 1.0 at lr 3e-3 diverged)."""
    codebooks: CodebookConfig = field(default_factory=lambda: CodebookConfig(
        num_codes=1000, k=1, placements=["attn_heads", "mlp_out"], kmeans_init=True,
        commitment_weight=1.0))  # fmt: skip
    """A codebook per attention head and per MLP output, k-means initialised; ``seed`` is the
    demo's. ``commitment_weight`` pulls each input toward its code: without it the
    straight-through gradient lets activations drift away and joint fine-tuning diverges.
    ``layer_norm`` (off) would keep the codes on a normalised scale. Dead-code revival stays off
    (``dead_code_steps`` 0): every revival splits a state's activations between two
    near-identical codes, which destroys the one-code-per-state structure the demo measures
    (measured: 95% -> 35% pure states)."""

    codebook_warmup_steps: int = 0
    """Train the codebooks only (model frozen, constant LR) for this many of the fine-tuning
    steps before joint training. Off by default: measured at seeds 0 and 1 it did not help
    (seed 0: 92% -> 80% pure states at the same accuracy; seed 1: 92.5% -> 91.6% transition
    accuracy), though one separate fine-tune of a longer-trained base gained from it."""
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
    base_only: bool = False
    """Stop after the base stage (its curve, metrics, gate and restarts; no codebooks): for
    studying base training at many seeds."""
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
        for name in ("eval_sequences", "transition_samples", "intervention_pairs",
                     "intervention_prefix_states", "check_sequences"):  # fmt: skip
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
        steps = self.codebook_training.steps
        if not 0 <= self.codebook_warmup_steps < steps:
            raise ValueError(
                f"codebook_warmup_steps={self.codebook_warmup_steps} is invalid; it must be an "
                f"integer in [0, codebook_steps={steps})"
            )
        if not 0 < self.purity_threshold <= 1:
            raise ValueError(f"purity_threshold={self.purity_threshold} must be in (0, 1]")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A tiny run for tests and smoke checks (about a minute on 2 cores; its base stage is
        too short to meet the criterion, so the gate is off)."""
        values: dict[str, Any] = dict(
            num_states=12, num_edges=3, seq_len=33, layers=2, width=64, heads=4, mlp_width=128,
            base_steps=40, batch_size=32, warmup_steps=5, base_warmup_steps=5, num_codes=64,
            codebook_steps=30, eval_sequences=48, transition_samples=24, intervention_pairs=24,
            intervention_prefix_states=4, dead_code_steps=10, codebook_warmup_steps=10,
            check_every=20, check_sequences=16, base_gate=False,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def model_config(self) -> ModelConfig:
        """``lm`` as built: a context that fits the patching experiment's sequences too, tied
        embeddings for gpt2 only, rotary_fraction for gpt_neox only."""
        arch = self.lm.arch
        return replace(
            self.lm,
            context=max(self.seq_len, 2 * self.intervention_prefix_states + 3),
            rotary_fraction=self.lm.rotary_fraction if arch == "gpt_neox" else None,
            tie_embeddings=arch == "gpt2",
        )

    def fsm_config(self) -> FSMConfig:
        return FSMConfig(self.num_states, self.num_edges, self.base, self.seq_len, self.fsm_seed)

    def codebook_config(self) -> CodebookConfig:
        """``codebooks`` as attached (seeded by the demo's seed)."""
        return replace(self.codebooks, seed=self.seed)
