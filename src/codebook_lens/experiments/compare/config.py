"""``CompareConfig``: every setting of ``codebook-lens experiment compare``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codebook_lens.config import check_choice, check_int, check_range

METHODS = (
    "codebook_posthoc",
    "sparsify_topk",
    "saelens_batchtopk",
    "saelens_matryoshka",
    "neuron",
    "kmeans",
)
"""Methods fitted post hoc to a workload's activations (every workload has them)."""

FINETUNED_METHODS = ("codebook_finetuned",)
"""Methods that exist only where a model was trained with codebooks (TokFSM, the LM)."""

WORKLOADS = ("synthetic", "fsm", "lm")
"""Workloads the command runs."""

SIZES = ("cpu", "16k")


@dataclass
class CompareConfig:
    """Codebooks against sparse autoencoders at matched size and L0 (``experiment compare``)."""

    out: str = "runs/compare"
    """Output folder: report.md, report.html, metrics.json, config.json, plots."""
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    """Workloads to run ('synthetic': SAELens's ground-truth benchmark; 'fsm': the TokFSM
    demo's model at its MLP outputs; 'lm': the topic experiment's BBC language model at its
    attention outputs)."""
    methods: list[str] = field(default_factory=lambda: [*METHODS, *FINETUNED_METHODS])
    """Methods to fit and score (see ``METHODS``; 'codebook_finetuned': the codebooks trained
    inside the model, the FSM demo's MLP codebooks or the LM's head codebooks; not synthetic)."""
    quick: bool = False
    """Tiny sizes and budgets: end to end in about a minute (tests, smoke runs)."""

    size: Literal["cpu", "16k"] = "cpu"
    """Synthetic world: 'cpu' = ``num_features`` features in ``hidden_dim`` dims; '16k' =
    SynthSAEBench-16k's size (16,384 features in 768 dims, dictionaries of 4,096; use
    ``--device cuda``)."""
    num_features: int = 4096
    """Ground-truth features of the synthetic world ('cpu' size)."""
    hidden_dim: int = 256
    """Width of the synthetic activations ('cpu' size)."""
    num_latents: int = 1024
    """Dictionary size of every method (codes, SAE latents); the identity dictionary of
    ``neuron`` has ``hidden_dim``. A quarter of the true features, as SynthSAEBench advises."""
    k: int = 16
    """L0 of every method: codes per token, SAE k (BatchTopK: on average)."""
    l0_grid: list[int] = field(default_factory=lambda: [8])
    """Further L0 values scored (at the chosen learning rates) for the metric-vs-L0 plot."""
    training_samples: int = 131_072
    """Activation budget: training tokens every method sees (the same samples for all).
    Small at the default size because SAELens's generator draws about 1,300 samples a second
    of this world on one CPU core (measured)."""
    batch_size: int = 512
    """Tokens per optimizer step (every trained method)."""
    lr_factors: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    """The learning-rate sweep: each library's recommended rate times these; chosen on the
    development seed's validation samples (explained variance)."""
    val_samples: int = 8192
    """Validation samples of the development seed (learning-rate choice)."""
    eval_samples: int = 16_384
    """Samples ``eval_sae_on_synthetic_data`` scores each method on."""
    dev_seed: int = 0
    """Seed of the world and data on which the learning rates are chosen (never scored)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds scored (world, data, initialisation); at least 3 for mean and spread."""
    hierarchy: bool = True
    """Synthetic world with SAELens's feature hierarchy (mutually exclusive children)."""
    correlation: bool = True
    """Synthetic world with SAELens's low-rank feature correlations."""
    orthogonalize: Literal["auto", "on", "off"] = "auto"
    """Orthogonalise the true features (SynthSAEBench's 100 steps); 'auto' = only at the '16k'
    size (the 100 steps take about 4 minutes per world on one CPU core at 4,096 x 256)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""

    fsm_run: str = ""
    """TokFSM: a finished ``codebook-lens demo`` run folder whose models are compared; '' runs
    the demo (its defaults at seed ``fsm_seed``; its quick settings with --quick) into
    ``<out>/tokfsm_demo``."""
    fsm_seed: int = 0
    """TokFSM: seed of the machine and models when the demo is run here."""
    fsm_num_latents: int = 0
    """TokFSM: dictionary size of the post-hoc methods; 0 = the demo's codes per codebook."""
    fsm_k: int = 0
    """TokFSM: L0 of the post-hoc methods; 0 = the demo's codes per token."""
    fsm_sequences: int = 2048
    """TokFSM: walks whose activations every method is fitted to (the activation budget:
    64 tokens each at the demo's length), new walks at each seed."""
    fsm_val_sequences: int = 256
    """TokFSM: walks of the dev seed on which the learning rates are chosen."""
    fsm_eval_sequences: int = 512
    """TokFSM: held-out walks each seed is scored on."""
    fsm_steer_pairs: int = 300
    """TokFSM: walks steered to another state at each seed (the demo's patching pairs); 0: no
    steering."""

    lm_run: str = ""
    """LM: a finished ``codebook-lens experiment topics`` run folder (model/, base/,
    metrics.json) used at every seed; '' trains the topic experiment's models (its defaults;
    its quick settings with --quick) at the dev seed and at each scored seed into
    ``<out>/lm_topics/seed_<s>``."""
    lm_num_latents: int = 0
    """LM: dictionary size per layer of the post-hoc methods; 0 = heads x codes per head of
    the fine-tuned codebooks (4 x 1,024 at the topic defaults)."""
    lm_k: int = 0
    """LM: L0 per layer of the post-hoc methods; 0 = heads x k of the fine-tuned codebooks
    (4 x 8)."""
    lm_training_tokens: int = 262_144
    """LM: tokens of the LM's training documents every method is fitted to (new blocks at each
    seed; the activation budget)."""
    lm_val_tokens: int = 16_384
    """LM: tokens of other training blocks on which the learning rates are chosen (dev seed)."""
    lm_eval_tokens: int = 100_000
    """LM: tokens of the held-out documents scored (concepts, explained variance, L0, dead)."""
    lm_ce_tokens: int = 32_768
    """LM: of those, tokens the CE-loss score runs the model over (once per method, site and
    seed, plus the clean and ablated references)."""

    def __post_init__(self) -> None:
        for name in ("workloads", "methods"):
            values = getattr(self, name)
            allowed = WORKLOADS if name == "workloads" else (*METHODS, *FINETUNED_METHODS)
            if not values:
                raise ValueError(f"{name}=[] is invalid; choose from {', '.join(allowed)}")
            for v in values:
                check_choice(name, v, allowed)
        check_choice("size", self.size, SIZES)
        check_choice("orthogonalize", self.orthogonalize, ("auto", "on", "off"))
        check_choice("device", self.device, ("cpu", "cuda"))
        for name in ("num_features", "hidden_dim", "num_latents", "k", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("training_samples", "val_samples", "eval_samples"):
            check_int(name, getattr(self, name), 64)
        check_int("dev_seed", self.dev_seed, 0)
        for name in ("fsm_seed", "fsm_num_latents", "fsm_k", "fsm_steer_pairs"):
            check_int(name, getattr(self, name), 0)
        for name in ("fsm_sequences", "fsm_val_sequences", "fsm_eval_sequences"):
            check_int(name, getattr(self, name), 8)
        for name in ("lm_num_latents", "lm_k"):
            check_int(name, getattr(self, name), 0)
        for name in ("lm_training_tokens", "lm_val_tokens", "lm_eval_tokens", "lm_ce_tokens"):
            check_int(name, getattr(self, name), 256)
        if len(self.seeds) < 3 and not self.quick:
            raise ValueError(
                f"seeds={self.seeds!r} is invalid; give at least 3 seeds (mean and spread)"
            )
        for s in self.seeds:
            check_int("seeds", s, 0)
        if self.dev_seed in self.seeds:
            raise ValueError(
                f"seeds={self.seeds!r} is invalid: it holds dev_seed={self.dev_seed}; settings "
                "are chosen on the development seed, which is never scored"
            )
        try:  # flags give "0.3,1" as strings
            self.lr_factors = [float(v) for v in self.lr_factors]
        except (TypeError, ValueError):
            raise ValueError(f"lr_factors={self.lr_factors!r} is invalid; give numbers") from None
        if not self.lr_factors:
            raise ValueError("lr_factors=[] is invalid; give at least one factor, e.g. 1")
        for v in self.lr_factors:
            check_range("lr_factors", v, 0.0, low_open=True)
        for v in self.l0_grid:
            check_int("l0_grid", v, 1)
        if self.size == "16k":
            self.num_features, self.hidden_dim, self.num_latents = 16_384, 768, 4096
            self.k = 25 if self.k == 16 else self.k
        if self.quick:
            self.apply_quick()
        for v in [self.k, *self.l0_grid]:
            if v > min(self.num_latents, self.hidden_dim):
                raise ValueError(
                    f"k={v} is invalid; it must be <= num_latents={self.num_latents} and <= "
                    f"hidden_dim={self.hidden_dim}"
                )

    def apply_quick(self) -> None:
        """Shrink everything so the command runs end to end in about a minute."""
        self.num_features, self.hidden_dim = min(self.num_features, 256), min(self.hidden_dim, 32)
        self.num_latents, self.k = min(self.num_latents, 64), min(self.k, 4)
        self.l0_grid = [min(v, 8) for v in self.l0_grid[:1]]
        self.training_samples = min(self.training_samples, 16_384)
        self.batch_size = min(self.batch_size, 256)
        self.val_samples, self.eval_samples = 1024, 2048
        self.lr_factors = self.lr_factors[:2]
        self.seeds = self.seeds[:2]  # the fewest that give a spread
        self.fsm_sequences = min(self.fsm_sequences, 256)
        self.fsm_val_sequences = min(self.fsm_val_sequences, 64)
        self.fsm_eval_sequences = min(self.fsm_eval_sequences, 128)
        self.fsm_steer_pairs = min(self.fsm_steer_pairs, 32)
        self.lm_training_tokens = min(self.lm_training_tokens, 16_384)
        self.lm_val_tokens = min(self.lm_val_tokens, 2048)
        self.lm_eval_tokens = min(self.lm_eval_tokens, 6000)
        self.lm_ce_tokens = min(self.lm_ce_tokens, 2048)

    def posthoc_methods(self) -> list[str]:
        """``methods`` without the fine-tuned ones (what the synthetic workload fits)."""
        return [m for m in self.methods if m in METHODS]

    def k_values(self) -> list[int]:
        """Every L0 scored: ``k`` first, then the grid."""
        return [self.k, *sorted(set(self.l0_grid) - {self.k})]
