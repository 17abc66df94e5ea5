"""``TopicsConfig``: every setting of the topic steering experiment, and its prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from codebook_lens.config import check_choice, check_range, flat_names
from codebook_lens.model.config import CodebookConfig
from codebook_lens.training.base_models import ModelConfig
from codebook_lens.training.loop import TrainConfig

NEUTRAL_PROMPTS = (
    "The",
    "Yesterday",
    "In a statement,",
    "It was",
    "On Monday",
    "According to",
    "A new",
    "This week",
)

# Prompts on which the steering settings are chosen; the evaluation prompts never are.
TUNE_PROMPTS = (
    "Last night",
    "Earlier today",
    "In a report,",
    "There are",
    "After the",
    "For many",
    "Meanwhile,",
    "Speaking to",
)


_QUIET_TRAINING: dict[str, Any] = {"eval_every": 0, "checkpoint_every": 0, "log_every": 50}


@flat_names(
    lm=("width", "num_layers", "heads", "tokenizer"),
    codebooks=("num_codes", "k", "placements", "reduction"),
    pretrain_steps="pretrain.steps",
    finetune_steps="finetune.steps",
    batch_size=("pretrain.batch_size", "finetune.batch_size"),
    lr=("pretrain.lr", "finetune.lr"),
)
@dataclass
class TopicsConfig:
    """The topic steering experiment (``codebook-lens experiment topics``)."""

    out: str = "runs/topics"
    """Output folder: report.md, report.html, metrics.json, chart, model, cache, classifier."""

    model: str | None = None
    """A saved codebook model with its tokenizer to use; None trains one on the LM split
    (reused from OUT/model on the next run when the settings match)."""

    data: str = "bbc"
    """Labelled corpus (documents with topic labels); the default is BBC News (5 topics)."""

    heldout_fraction: float = 0.3
    """Documents the LM never sees; the topic classifier is trained and tested on them."""

    classifier_test_fraction: float = 0.3
    """Part of the held-out documents used only to measure the classifier's accuracy."""

    doc_limit: int | None = None
    """Use at most this many documents (round-robin over topics); None = all."""

    quick: bool = False
    """Tiny model, few steps, few samples: end to end in seconds (for tests and smoke runs)."""

    # the model (when training one)
    lm: ModelConfig = field(default_factory=lambda: ModelConfig(
        arch="gpt2", num_layers=4, width=128, heads=4, context=256, tokenizer="bpe:2048"))  # fmt: skip
    """The LM trained from scratch (one codebook per attention head); its context is at least
    ``block_size``."""
    block_size: int = 128
    """Training sequence length."""
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, lr=3e-3, batch_size=16, warmup_steps=100, **_QUIET_TRAINING))  # fmt: skip
    """LM pretraining; warmup is at most a tenth of the steps, and ``seed``, ``progress`` are
    the experiment's."""
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, lr=3e-3, model_lr_factor=0.1, batch_size=16, warmup_steps=50,
        **_QUIET_TRAINING))  # fmt: skip
    """Codebook fine-tuning of a copy of the LM; the same rules as ``pretrain``."""
    codebooks: CodebookConfig = field(default_factory=lambda: CodebookConfig(
        num_codes=1024, k=8, placements=["attn_heads"], kmeans_init=True, dead_code_steps=50))  # fmt: skip
    """Codebooks of the fine-tuned model ('attn_heads': one per head, the steering codes;
    'mlp_out' adds one per MLP output); ``seed`` is the experiment's."""

    # code search
    cache_tokens: int = 200_000
    """Tokens of the LM split run through the codebook model for the code cache."""
    codes_per_topic: int = 64
    """Topic codes forced at once (over all heads and layers) without a tuning sweep."""
    max_codes_per_head: int = 4
    """At most this many forced codes per head (<= k with slot='replace-lowest')."""
    min_precision: float = 0.5
    """A topic code's firings must land in that topic's documents at least this often."""
    min_count: int = 20
    """A topic code must fire on at least this many tokens of the cache."""

    selection: Literal["firing", "effect", "both"] = "both"
    """How a topic's codes are ranked: 'firing' = where they fire (precision x document
    coverage); 'effect' = what they do when forced alone on contexts sampled from the tuning
    prompts (change of the next token's expected topic log-likelihood ratio, ``code_effects``);
    'both' = the tuning sweep tries both rankings and keeps the better per topic (needs
    ``tune_codes``). The candidates are the same in all."""
    effect_evidence: Literal["tokens", "documents"] = "tokens"
    """'effect': a token's topic evidence from its counts in the topic's documents ('tokens')
    or from the share of the topic's documents that contain it ('documents', robust to names
    repeated through a few articles); see ``token_topic_llr``."""
    effect_contexts: int = 2
    """'effect': unsteered samples per tuning prompt used as contexts."""
    effect_length: int = 32
    """'effect': tokens per context."""

    # steering
    slot: Literal["replace-lowest", "append"] = "append"
    """Where forced codes go: 'replace-lowest' or 'append'."""
    scale: float = 2.0
    """Weight of the forced code vectors without a tuning sweep (and when measuring code
    effects)."""
    prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Neutral evaluation prompts; each starts a new document (after the end-of-text token).
    Never used to choose a setting."""
    tune_prompts: list[str] = field(default_factory=lambda: list(TUNE_PROMPTS))
    """Neutral prompts on which settings are chosen (code effects, the tuning sweep); must not
    overlap ``prompts``."""
    tune_codes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    """Tuning sweep: numbers of forced codes tried per topic on the tuning prompts (with every
    ``tune_scales`` value and, with ``selection='both'``, both rankings); per topic the setting
    with the best gain whose perplexity stays within ``tune_perplexity_ratio`` of the unsteered
    one is evaluated. Empty = no sweep (``codes_per_topic`` and ``scale`` for every topic;
    needs ``selection`` 'firing' or 'effect')."""
    tune_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    """Tuning sweep: scales tried (empty = just ``scale``)."""
    tune_samples_per_prompt: int = 8
    """Samples per tuning prompt and setting."""
    max_perplexity_ratio: float = 1.5
    """The fluency bound of the target: a topic's steered perplexity on the evaluation prompts
    at most this times the unsteered one."""
    tune_perplexity_ratio: float = 1.4
    """Tuning: a setting qualifies when its perplexity on the tuning prompts is at most this
    times the unsteered one there; at most ``max_perplexity_ratio``, and below it a margin for
    the prompt-to-prompt variation of the ratio, so that the bound still holds on the
    evaluation prompts. 1.4 was chosen on the tuning prompts alone (seed 0, docs/topics.md):
    choosing on half of them, it met the target most often on the other half."""
    samples_per_prompt: int = 8
    """Samples per prompt and condition (unsteered, each topic)."""
    max_new_tokens: int = 48
    """Tokens generated per sample."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int | None = 50
    """Sample from the k likeliest tokens (None = full distribution)."""
    seed: int = 0
    """Seed of splits, training, sampling."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_range("heldout_fraction", self.heldout_fraction, 0.0, 0.9, low_open=True)
        check_range(
            "classifier_test_fraction", self.classifier_test_fraction, 0.0, 0.9, low_open=True
        )
        check_range("min_precision", self.min_precision, 0.0, 1.0)
        check_range("scale", self.scale)
        check_range("temperature", self.temperature, 0.0)
        check_choice("slot", self.slot, ("replace-lowest", "append"))
        check_choice("selection", self.selection, ("firing", "effect", "both"))
        if self.selection == "both" and not self.tune_codes:
            raise ValueError(
                "selection='both' is invalid without tune_codes: the tuning sweep chooses "
                "between the rankings (give tune_codes, e.g. 16,32,64)"
            )
        check_choice("effect_evidence", self.effect_evidence, ("tokens", "documents"))
        check_range("max_perplexity_ratio", self.max_perplexity_ratio, 1.0)
        check_range(
            "tune_perplexity_ratio", self.tune_perplexity_ratio, 1.0, self.max_perplexity_ratio
        )
        try:  # flags give "1.5,2" as strings
            self.tune_scales = [float(v) for v in self.tune_scales]
        except (TypeError, ValueError):
            raise ValueError(
                f"tune_scales={self.tune_scales!r} is invalid; give numbers, e.g. 1,2,3"
            ) from None
        for v in self.tune_scales:
            check_range("tune_scales", v, 0.0)
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.tune_codes
        ):
            raise ValueError(
                f"tune_codes={self.tune_codes!r} is invalid; give integers >= 1, e.g. 16,32,64"
            )
        for name in (
            "block_size",
            "cache_tokens",
            "codes_per_topic",
            "max_codes_per_head",
            "samples_per_prompt",
            "max_new_tokens",
            "effect_contexts",
            "effect_length",
            "tune_samples_per_prompt",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid; it must be an integer >= 1")
        k = self.codebooks.k
        if self.slot == "replace-lowest" and self.max_codes_per_head > k:
            raise ValueError(
                f"max_codes_per_head={self.max_codes_per_head} is invalid with "
                f"slot='replace-lowest': it must be <= k={k}"
            )
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"prompts={self.prompts!r} is invalid; give non-empty strings")
        if not self.tune_prompts or not all(
            isinstance(p, str) and p.strip() for p in self.tune_prompts
        ):
            raise ValueError(
                f"tune_prompts={self.tune_prompts!r} is invalid; give non-empty strings"
            )
        shared = sorted(set(self.prompts) & set(self.tune_prompts))
        if shared:
            raise ValueError(
                f"tune_prompts={self.tune_prompts!r} is invalid: {shared} are also evaluation "
                "prompts; settings must be chosen on prompts the evaluation never uses"
            )
        if self.quick:
            self.apply_quick()

    def apply_quick(self) -> None:
        """Shrink everything so the pipeline runs end to end in seconds."""
        self.doc_limit = min(self.doc_limit or 100, 100)
        tokenizer = "bpe:300" if self.lm.tokenizer.startswith("bpe:") else self.lm.tokenizer
        self.lm = replace(self.lm, width=32, num_layers=2, heads=2, tokenizer=tokenizer)
        self.block_size = 32
        self.pretrain = replace(self.pretrain, steps=12, batch_size=8)
        self.finetune = replace(self.finetune, steps=8, batch_size=8)
        self.codebooks = replace(self.codebooks, num_codes=32, k=4)
        self.cache_tokens = 6_000
        self.codes_per_topic, self.min_count = 4, 3
        self.max_codes_per_head = min(self.max_codes_per_head, self.codebooks.k)
        self.prompts = self.prompts[:2]
        self.tune_prompts = self.tune_prompts[:2]
        self.samples_per_prompt, self.max_new_tokens = 2, 12
        self.tune_samples_per_prompt, self.effect_contexts, self.effect_length = 1, 1, 8
        self.tune_codes = sorted({min(v, self.codes_per_topic) for v in self.tune_codes[:2]})
        self.tune_scales = self.tune_scales[:2]

    def base_key(self) -> dict[str, Any]:
        """Settings that determine the pretrained base LM (reused when equal, so changing only
        codebook settings does not pretrain again)."""
        return {
            "data": self.data,
            "heldout_fraction": self.heldout_fraction,
            "doc_limit": self.doc_limit,
            "lm": asdict(self.lm),
            "block_size": self.block_size,
            "pretrain": asdict(self.pretrain),
            "seed": self.seed,
        }

    def model_key(self) -> dict[str, Any]:
        """Settings that determine the trained model (a saved one is reused when equal)."""
        return {
            **self.base_key(),
            "finetune": asdict(self.finetune),
            "codebooks": asdict(self.codebooks),
        }
