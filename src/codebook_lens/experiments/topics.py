"""Topic steering (METHOD.md section 3): force a topic's codes on, and generations follow.

Pipeline, on the BBC News corpus (5 topics):

1. a codebook model (codebooks on the attention heads) trained on the LM split of BBC;
2. a code cache over those documents; for each topic, the codes that fire throughout that
   topic's documents and rarely elsewhere (high document coverage and high precision);
3. generation from neutral prompts ("The", "Yesterday", ...) without and with those codes forced
   on at every position (``intervene.generate`` with a paired seed);
4. each generation is judged by a topic classifier trained on held-out BBC articles that the LM
   never saw (multinomial naive Bayes on words, uniform prior); the fluency check is the
   perplexity of the generations under the model with no intervention.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from codebook_lens.config import check_choice, check_range, read_json, write_json_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

    from codebook_lens.codes.cache import CodeCache
    from codebook_lens.codes.intervene import Generation, InterventionSpec
    from codebook_lens.model.codebook_model import CodebookModel
    from codebook_lens.training.data import Document

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (the classifier's features)."""
    return _WORD.findall(text.lower())


class TopicClassifier:
    """Multinomial naive Bayes over word counts, with a uniform prior over topics.

    The prior is uniform on purpose: a generation with no topical words should not be pulled
    towards the topic with the most training articles, so the unsteered on-topic rates are not
    inflated for large topics.
    """

    def __init__(self, labels: list[str], vocab: list[str], log_probs: np.ndarray) -> None:
        if log_probs.shape != (len(labels), len(vocab)):
            raise ValueError(
                f"log_probs has shape {log_probs.shape}; expected ({len(labels)}, {len(vocab)})"
            )
        self.labels = labels
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.log_probs = log_probs
        """``(labels, vocab)`` log P(word | label)."""

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        alpha: float = 0.5,
        min_count: int = 2,
    ) -> TopicClassifier:
        """Train on ``texts`` with their ``labels``; words seen fewer than ``min_count`` times
        in total are dropped. ``alpha`` is the additive (Laplace/Lidstone) smoothing."""
        if len(texts) != len(labels) or not texts:
            raise ValueError(
                f"texts ({len(texts)}) and labels ({len(labels)}) must be non-empty and equally long"
            )
        if alpha <= 0:
            raise ValueError(f"alpha={alpha!r} is invalid; it must be > 0")
        names = sorted(set(labels))
        if len(names) < 2:
            raise ValueError(f"labels={names} is invalid; the classifier needs >= 2 topics")
        docs = [Counter(words(t)) for t in texts]
        total: Counter[str] = Counter()
        for d in docs:
            total.update(d)
        vocab = sorted(w for w, c in total.items() if c >= min_count)
        index = {w: i for i, w in enumerate(vocab)}
        counts = np.zeros((len(names), len(vocab)), dtype=np.float64)
        row = {n: i for i, n in enumerate(names)}
        for d, label in zip(docs, labels, strict=True):
            r = row[label]
            for w, c in d.items():
                j = index.get(w)
                if j is not None:
                    counts[r, j] += c
        counts += alpha
        log_probs = np.log(counts / counts.sum(1, keepdims=True))
        return cls(names, vocab, log_probs)

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)), dtype=np.float64)
        for i, t in enumerate(texts):
            for w in words(t):
                j = self.index.get(w)
                if j is not None:
                    x[i, j] += 1
        return x

    def log_posterior(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, labels)`` normalised log P(label | text) (uniform prior)."""
        scores = self._features(texts) @ self.log_probs.T
        return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str | None]:
        """Most likely topic of each text; ``None`` for a text with no known word (judged
        off every topic rather than given an arbitrary label)."""
        known = self._features(texts).sum(1) > 0
        best = self.log_posterior(texts).argmax(1)
        return [self.labels[i] if k else None for i, k in zip(best, known, strict=True)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        if not texts:
            raise ValueError("accuracy of an empty set is undefined; give at least one text")
        pred = self.predict(texts)
        return float(np.mean([p == y for p, y in zip(pred, labels, strict=True)]))

    def top_words(self, label: str, n: int = 10) -> list[str]:
        """Words most indicative of ``label`` (largest log-probability ratio to the others)."""
        r = self.labels.index(label)
        others = np.logaddexp.reduce(np.delete(self.log_probs, r, axis=0), axis=0) - math.log(
            len(self.labels) - 1
        )
        ratio = self.log_probs[r] - others
        return [self.vocab[j] for j in np.argsort(-ratio)[:n]]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``classifier.json`` (labels, vocab) and ``classifier_log_probs.npy``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".classifier_log_probs.npy.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.save(f, self.log_probs, allow_pickle=False)
            os.replace(tmp, out / "classifier_log_probs.npy")
        finally:
            tmp.unlink(missing_ok=True)
        write_json_atomic(
            out / "classifier.json",
            {"kind": "multinomial_naive_bayes", "labels": self.labels, "vocab": self.vocab},
        )
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TopicClassifier:
        d = Path(directory)
        try:
            meta = json.loads((d / "classifier.json").read_text(encoding="utf-8"))
            log_probs = np.load(d / "classifier_log_probs.npy", allow_pickle=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{d}: no saved topic classifier ({e.filename})") from None
        return cls(list(meta["labels"]), list(meta["vocab"]), log_probs)


# ------------------------------------------------------------------ config
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

    # model (when training one)
    width: int = 128
    """Hidden size of the LM trained from scratch."""
    num_layers: int = 4
    """Blocks of the LM trained from scratch."""
    heads: int = 4
    """Attention heads (one codebook per head)."""
    tokenizer: str = "bpe:2048"
    """Tokenizer of the LM trained from scratch: 'bpe:N', 'gpt2' or a folder."""
    block_size: int = 128
    """Training sequence length."""
    pretrain_steps: int = 800
    """Optimizer steps of LM pretraining."""
    finetune_steps: int = 300
    """Optimizer steps of codebook fine-tuning (codebooks on every attention head)."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (pretraining, and codebooks in fine-tuning)."""
    num_codes: int = 1024
    """Codes per head codebook."""
    k: int = 8
    """Codes chosen per token and head."""
    placements: list[str] = field(default_factory=lambda: ["attn_heads"])
    """Codebook placements of the fine-tuned model ('attn_heads': one codebook per head, the
    steering codes; 'mlp_out' adds one per MLP output)."""
    reduction: Literal["sum", "mean"] = "sum"
    """A codebook's output is the 'sum' of its k codes (the paper's choice) or their 'mean'."""

    # code search
    cache_tokens: int = 200_000
    """Tokens of the LM split run through the codebook model for the code cache."""
    codes_per_topic: int = 64
    """Topic codes forced at once (over all heads and layers)."""
    max_codes_per_head: int = 4
    """At most this many forced codes per head (<= k with slot='replace-lowest')."""
    min_precision: float = 0.5
    """A topic code's firings must land in that topic's documents at least this often."""
    min_count: int = 20
    """A topic code must fire on at least this many tokens of the cache."""

    selection: Literal["firing", "effect", "both"] = "firing"
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
    """Weight of the forced code vectors."""
    prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Neutral evaluation prompts; each starts a new document (after the end-of-text token).
    Never used to choose a setting."""
    tune_prompts: list[str] = field(default_factory=lambda: list(TUNE_PROMPTS))
    """Neutral prompts on which settings are chosen (code effects, the tuning sweep); must not
    overlap ``prompts``."""
    tune_codes: list[int] = field(default_factory=list)
    """Tuning sweep: numbers of forced codes tried per topic on the tuning prompts (with every
    ``tune_scales`` value); per topic the setting with the best gain whose perplexity stays
    within ``max_perplexity_ratio`` of the unsteered one is evaluated. Empty = no sweep
    (``codes_per_topic`` and ``scale`` for every topic)."""
    tune_scales: list[float] = field(default_factory=list)
    """Tuning sweep: scales tried (empty = just ``scale``)."""
    tune_samples_per_prompt: int = 4
    """Samples per tuning prompt and setting."""
    max_perplexity_ratio: float = 1.5
    """Tuning: a setting qualifies when its perplexity is at most this times the unsteered."""
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
        check_choice("reduction", self.reduction, ("sum", "mean"))
        check_choice("selection", self.selection, ("firing", "effect", "both"))
        if self.selection == "both" and not self.tune_codes:
            raise ValueError(
                "selection='both' is invalid without tune_codes: the tuning sweep chooses "
                "between the rankings (give tune_codes, e.g. 16,32,64)"
            )
        check_choice("effect_evidence", self.effect_evidence, ("tokens", "documents"))
        check_range("max_perplexity_ratio", self.max_perplexity_ratio, 1.0)
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
            "width",
            "num_layers",
            "heads",
            "block_size",
            "pretrain_steps",
            "finetune_steps",
            "batch_size",
            "num_codes",
            "k",
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
        if self.slot == "replace-lowest" and self.max_codes_per_head > self.k:
            raise ValueError(
                f"max_codes_per_head={self.max_codes_per_head} is invalid with "
                f"slot='replace-lowest': it must be <= k={self.k}"
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
        self.width, self.num_layers, self.heads = 32, 2, 2
        self.tokenizer = "bpe:300" if self.tokenizer.startswith("bpe:") else self.tokenizer
        self.block_size, self.batch_size = 32, 8
        self.pretrain_steps, self.finetune_steps = 12, 8
        self.num_codes, self.k = 32, 4
        self.cache_tokens = 6_000
        self.codes_per_topic, self.min_count = 4, 3
        self.max_codes_per_head = min(self.max_codes_per_head, self.k)
        self.prompts = self.prompts[:2]
        self.tune_prompts = self.tune_prompts[:2]
        self.samples_per_prompt, self.max_new_tokens = 2, 12
        self.tune_samples_per_prompt, self.effect_contexts, self.effect_length = 1, 1, 8
        self.tune_codes = sorted({min(v, self.codes_per_topic) for v in self.tune_codes[:2]})
        self.tune_scales = self.tune_scales[:2]

    def base_key(self) -> dict[str, Any]:
        """Settings that determine the pretrained base LM (reused when equal, so changing only
        codebook settings does not pretrain again)."""
        keys = (
            "data",
            "heldout_fraction",
            "doc_limit",
            "width",
            "num_layers",
            "heads",
            "tokenizer",
            "block_size",
            "pretrain_steps",
            "batch_size",
            "lr",
            "seed",
        )
        return {k: getattr(self, k) for k in keys}

    def model_key(self) -> dict[str, Any]:
        """Settings that determine the trained model (a saved one is reused when equal)."""
        return {
            **self.base_key(),
            "finetune_steps": self.finetune_steps,
            "num_codes": self.num_codes,
            "k": self.k,
            "placements": list(self.placements),
            "reduction": self.reduction,
        }


# -------------------------------------------------------------------- data
def interleave(docs: Sequence[Document]) -> list[Document]:
    """Documents round-robin over labels, so any prefix (a cache cut at ``max_tokens``)
    covers every topic evenly."""
    by: dict[str | None, list[Document]] = {}
    for d in docs:
        by.setdefault(d.label, []).append(d)
    queues = [list(v) for _, v in sorted(by.items(), key=lambda kv: str(kv[0]))]
    out: list[Document] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


@dataclass
class Splits:
    """Who sees which documents: the LM, the classifier, the classifier's test."""

    lm: list[Document]
    classifier_train: list[Document]
    classifier_test: list[Document]


def split_corpus(cfg: TopicsConfig) -> Splits:
    from codebook_lens.training.data import load_documents, split_documents

    docs = load_documents(cfg.data, limit=cfg.doc_limit)
    unlabelled = [d.id for d in docs if d.label is None]
    if unlabelled:
        raise ValueError(
            f"data={cfg.data!r}: documents need topic labels (e.g. one sub-folder per topic); "
            f"{len(unlabelled)} have none, e.g. {unlabelled[:3]}"
        )
    lm, held = split_documents(docs, cfg.heldout_fraction, seed=cfg.seed)
    clf_train, clf_test = split_documents(held, cfg.classifier_test_fraction, seed=cfg.seed + 1)
    return Splits(lm, clf_train, clf_test)


# ------------------------------------------------------------------- model
def prepare_model(
    cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path
) -> tuple[CodebookModel, Any, nn.Module | None, str]:
    """The codebook model, its tokenizer, the plain base LM (``None`` when a saved codebook
    model is given: then the fluency check uses it with codebooks off), and where it came from.

    Training: pretrain a small LM from scratch on ``lm_docs`` (``pipeline.pretrain_base``), then
    attach codebooks to every attention head of a copy and fine-tune
    (``pipeline.fine_tune_codebooks``).
    Both are saved under ``out`` and reused when ``cfg.model_key()`` matches.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codebook_lens.model.codebook_model import CodebookModel
    from codebook_lens.model.config import CodebookConfig
    from codebook_lens.model.tokenizer import load_tokenizer
    from codebook_lens.training.base_models import ModelConfig
    from codebook_lens.training.data import BatchStream, pack_tokens
    from codebook_lens.training.loop import TrainConfig
    from codebook_lens.training.pipeline import fine_tune_codebooks, pretrain_base

    device = torch.device(cfg.device)
    if cfg.model is not None:
        model = CodebookModel.from_pretrained(cfg.model, device=cfg.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except Exception:
            raise FileNotFoundError(
                f"model={cfg.model!r}: no tokenizer saved with it; save the model with "
                "save_pretrained(dir, tokenizer=...)"
            ) from None
        return model.eval(), tokenizer, None, str(cfg.model)

    model_dir, base_dir, key_file = out / "model", out / "base", out / "model_key.json"
    key = cfg.model_key()
    if key_file.is_file() and read_json(key_file) == key and (model_dir / "config.json").is_file():
        model = CodebookModel.from_pretrained(model_dir, device=cfg.device)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        loaded: nn.Module = AutoModelForCausalLM.from_pretrained(str(base_dir))
        loaded.to(device)
        return model.eval(), tokenizer, loaded.eval(), f"{model_dir} (reused)"

    base_key_file = out / "base_key.json"
    reuse_base = (
        base_key_file.is_file()
        and read_json(base_key_file) == cfg.base_key()
        and (base_dir / "config.json").is_file()
        and (base_dir / "tokenizer.json").is_file()
    )
    stale_paths = [model_dir, key_file, out / "train_codebooks"]
    if not reuse_base:
        stale_paths += [base_dir, base_key_file, out / "train_base"]
    for stale in stale_paths:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    common = {
        "batch_size": cfg.batch_size,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 50,
        "seed": cfg.seed,
        "progress": cfg.progress,
    }
    if reuse_base:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        base: nn.Module = AutoModelForCausalLM.from_pretrained(str(base_dir))
        base.to(device)
        blocks = pack_tokens(lm_docs, tokenizer, cfg.block_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer, lm_docs)
        mcfg = ModelConfig(
            arch="gpt2",
            num_layers=cfg.num_layers,
            width=cfg.width,
            heads=cfg.heads,
            context=max(cfg.block_size, 256),
            tokenizer=cfg.tokenizer,
        )
        blocks = pack_tokens(lm_docs, tokenizer, cfg.block_size)
        pre = TrainConfig(
            steps=cfg.pretrain_steps,
            lr=cfg.lr,
            warmup_steps=min(100, cfg.pretrain_steps // 10),
            **common,  # type: ignore[arg-type]
        )
        batches = BatchStream(blocks, cfg.batch_size, seed=cfg.seed)
        base = pretrain_base(mcfg, tokenizer, batches, pre, out / "train_base", device=device).model
        tmp = out / f".base.tmp-{os.getpid()}"
        base.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, base_dir)
        write_json_atomic(base_key_file, cfg.base_key())
    base.eval()
    cb_cfg = CodebookConfig(
        num_codes=cfg.num_codes,
        k=cfg.k,
        placements=list(cfg.placements),
        reduction=cfg.reduction,
        kmeans_init=True,
        dead_code_steps=50,
        seed=cfg.seed,
    )
    fine = TrainConfig(
        steps=cfg.finetune_steps,
        lr=cfg.lr,
        model_lr_factor=0.1,
        warmup_steps=min(50, cfg.finetune_steps // 10),
        **common,  # type: ignore[arg-type]
    )
    batches = BatchStream(blocks, cfg.batch_size, seed=cfg.seed + 1)
    trained = fine_tune_codebooks(
        copy.deepcopy(base), cb_cfg, batches, fine, out / "train_codebooks"
    )
    assert isinstance(trained.model, CodebookModel)
    model = trained.model
    model.eval()
    model.save_pretrained(model_dir, tokenizer=tokenizer)
    write_json_atomic(key_file, key)
    return model, tokenizer, base, str(model_dir)


def prepare_model_and_cache(
    cfg: TopicsConfig, lm_docs: Sequence[Document], out: Path
) -> tuple[CodebookModel, Any, nn.Module | None, str, CodeCache]:
    """``prepare_model`` plus the code cache of ``cfg.cache_tokens`` tokens of ``lm_docs``
    (round-robin over topics) in ``out/cache``; the cache is a pure function of the model and
    these settings, so it is reused when they match (``experiment concepts`` shares it)."""
    from codebook_lens.codes.cache import build_cache, load_cache

    model, tokenizer, base, model_source = prepare_model(cfg, lm_docs, out)
    cache_key = {
        "model": cfg.model_key() if cfg.model is None else cfg.model,
        "cache_tokens": cfg.cache_tokens,
        "block_size": cfg.block_size,
    }
    key_file = out / "cache_key.json"
    if (
        model_source.endswith("(reused)")
        and key_file.is_file()
        and read_json(key_file) == cache_key
        and (out / "cache" / "manifest.json").is_file()
    ):
        return model, tokenizer, base, model_source, load_cache(out / "cache")
    key_file.unlink(missing_ok=True)
    cache = build_cache(
        model,
        tokenizer,
        interleave(lm_docs),
        out / "cache",
        max_tokens=cfg.cache_tokens,
        seq_len=cfg.block_size,
        overwrite=True,
        progress=cfg.progress,
        source=cfg.data,
    )
    write_json_atomic(key_file, cache_key)
    return model, tokenizer, base, model_source, cache


# -------------------------------------------------------------- topic codes
@dataclass
class TopicCode:
    """A code that marks one topic."""

    codebook: str
    head: int | None
    code: int
    precision: float
    """Fraction of the code's firings inside the topic's documents."""
    coverage: float
    """Fraction of the topic's documents in which the code fires at least once."""
    count: int
    """Tokens on which the code fires (whole cache)."""
    effect: float | None = None
    """Forced alone: change of the next token's expected topic log-likelihood ratio (nats;
    ``code_effects``), ``None`` until measured."""
    cost: float | None = None
    """Forced alone: change of the next-token cross-entropy against the base model (nats)."""

    @property
    def score(self) -> float:
        return self.precision * self.coverage


def find_topic_codes(
    cache: CodeCache,
    topic: str,
    *,
    n: int | None,
    max_per_head: int,
    min_precision: float,
    min_count: int,
    codebooks: list[str] | None = None,
) -> list[TopicCode]:
    """Codes that fire throughout ``topic``'s documents and rarely elsewhere.

    Candidates come from ``search.search`` over the topic's documents (precision >=
    ``min_precision``, firing >= ``min_count`` times); each is scored by precision x document
    coverage, and the best ``n`` (``None`` = all) are kept with at most ``max_per_head`` per
    head.
    """
    from codebook_lens.codes.search import docs_pattern, search

    pattern = docs_pattern(cache, topic)
    found = search(
        cache,
        pattern,
        codebooks=codebooks,
        min_count=min_count,
        min_precision=min_precision,
        top=None,
        sort_by="precision",
    )
    docs = cache.docs
    topic_docs = np.array([d.label == topic for d in docs])
    n_topic = max(int(topic_docs.sum()), 1)
    doc_ids = np.asarray(cache.doc_ids)
    scored = []
    for m in found.matches:
        fired = np.unique(doc_ids[cache.positions(m.codebook, m.code, m.head)])
        coverage = float(topic_docs[fired].sum()) / n_topic
        scored.append(TopicCode(m.codebook, m.head, m.code, m.precision, coverage, m.count))
    scored.sort(key=lambda c: (-c.score, -c.count, c.codebook, c.head or 0, c.code))
    return cap_per_head(scored, n, max_per_head)


def cap_per_head(ranked: Sequence[TopicCode], n: int | None, max_per_head: int) -> list[TopicCode]:
    """The first ``n`` (``None`` = all) of ``ranked`` with at most ``max_per_head`` per head."""
    chosen: list[TopicCode] = []
    per_head: Counter[tuple[str, int | None]] = Counter()
    for c in ranked:
        if n is not None and len(chosen) >= n:
            break
        if per_head[(c.codebook, c.head)] < max_per_head:
            chosen.append(c)
            per_head[(c.codebook, c.head)] += 1
    return chosen


def token_topic_llr(
    cache: CodeCache,
    topics: Sequence[str],
    *,
    alpha: float = 0.5,
    count: Literal["tokens", "documents"] = "tokens",
) -> np.ndarray:
    """``(topics, vocab)`` topic evidence of each token, from the cache's documents (the LM's
    own text, not the judge's articles).

    ``count='tokens'``: log P(token | topic) - log P(token | the other topics) over token
    counts. ``count='documents'``: log P(a topic document contains the token) - log P(another
    document does); a name repeated through a few articles then carries little evidence, a
    word used across the topic's articles carries much. ``alpha``: additive smoothing.
    """
    tokens = np.asarray(cache.tokens).astype(np.int64)
    doc_ids = np.asarray(cache.doc_ids).astype(np.int64)
    doc_labels = np.array([str(d.label) for d in cache.docs])
    vocab = len(cache.vocab)
    out = np.zeros((len(topics), vocab))
    if count == "documents":
        pairs = np.unique(doc_ids * vocab + tokens)  # each (document, token) once
        d, t = pairs // vocab, pairs % vocab
        df = np.stack([np.bincount(t[doc_labels[d] == x], minlength=vocab) for x in topics]).astype(
            np.float64
        )
        nd = np.array([(doc_labels == x).sum() for x in topics], dtype=np.float64)
        for i in range(len(topics)):
            rest, n_rest = np.delete(df, i, axis=0).sum(0), np.delete(nd, i).sum()
            out[i] = np.log((df[i] + alpha) / (nd[i] + 2 * alpha)) - np.log(
                (rest + alpha) / (n_rest + 2 * alpha)
            )
        return out
    labels = doc_labels[doc_ids]
    counts = np.stack(
        [np.bincount(tokens[labels == t], minlength=vocab).astype(np.float64) for t in topics]
    )
    counts += alpha
    for i in range(len(topics)):
        rest = np.delete(counts, i, axis=0).sum(0)
        out[i] = np.log(counts[i] / counts[i].sum()) - np.log(rest / rest.sum())
    return out


def steering_contexts(
    model: CodebookModel,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    per_prompt: int,
    length: int,
    seed: int,
) -> torch.Tensor:
    """``(n, length)`` token ids: unsteered samples from ``prompts`` (after the end-of-text
    token), cut to ``length``; the teacher-forced contexts on which ``code_effects`` measures
    what a forced code does to the next-token distribution."""
    import torch

    from codebook_lens.codes.intervene import generate

    rows = []
    for pi, p in enumerate(prompts):
        ids = prompt_ids(tokenizer, p)
        gens = generate(
            model,
            tokenizer,
            ids,
            None,
            max_new_tokens=max(1, length - len(ids)),
            top_k=50,
            num_samples=per_prompt,
            seed=seed + 1000 + pi,
            stop_at_eos=False,
        )
        rows += [(ids + g.ids)[:length] for g in gens]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows], dtype=torch.long)


def code_effects(
    model: CodebookModel,
    base: nn.Module | None,
    codes: Sequence[TopicCode],
    contexts: torch.Tensor,
    llr: np.ndarray,
    *,
    slot: str,
    scale: float,
    progress: bool = False,
) -> list[TopicCode]:
    """Force each code alone at every position of ``contexts`` ``(n, length)`` and measure, at
    every position, the change of E[``llr``(next token)] (``effect``, nats) and of the
    next-token cross-entropy against the base model (``cost``, nats; the codebook model with
    codebooks off when ``base`` is None). Returns copies of ``codes`` with both set.

    Where a code fires says what it *detects*; this says what it *does* when forced, which is
    what steering needs (a code that fires throughout a topic's documents may only mark, say,
    proper names there, and forcing it writes name fragments, not the topic's words).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from codebook_lens.codes.intervene import EditSpec, InterventionSpec, intervene

    device = next(model.parameters()).device
    x = contexts.to(device)
    w = torch.as_tensor(llr, dtype=torch.float32, device=device)
    plen = x.shape[1]
    with torch.no_grad():
        if base is not None:
            ref = F.log_softmax(base(input_ids=x).logits.float(), -1)
        else:
            with model.disabled():
                ref = F.log_softmax(model(input_ids=x).logits.float(), -1)

        def measure(spec: InterventionSpec | None) -> tuple[float, float]:
            with intervene(model, spec, prompt_length=plen, length=plen):
                p = F.softmax(model(input_ids=x).logits.float(), -1)
            return float((p @ w).mean()), float(-(p * ref).sum(-1).mean())

        e0, c0 = measure(None)
        out = []
        for c in tqdm(codes, desc="code effects", disable=not progress):
            edit = EditSpec(
                c.codebook, [c.code], positions="all", action="force", slot=slot, scale=scale,  # type: ignore[arg-type]
                head=c.head,
            )  # fmt: skip
            e, cost = measure(InterventionSpec([edit]))
            out.append(replace(c, effect=e - e0, cost=cost - c0))
    return out


def steering_spec(
    codes: Sequence[TopicCode], *, slot: str = "replace-lowest", scale: float = 1.0
) -> InterventionSpec:
    """Force ``codes`` at every position: one edit per (codebook, head)."""
    from codebook_lens.codes.intervene import EditSpec, InterventionSpec

    groups: dict[tuple[str, int | None], list[int]] = {}
    for c in codes:
        groups.setdefault((c.codebook, c.head), []).append(c.code)
    return InterventionSpec(
        [
            EditSpec(cb, ids, positions="all", action="force", slot=slot, scale=scale, head=h)  # type: ignore[arg-type]
            for (cb, h), ids in groups.items()
        ]
    )


# ---------------------------------------------------------------- judging
def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """End-of-text token (a document starts) followed by the prompt's tokens."""
    from codebook_lens.model.tokenizer import separator_id

    return [separator_id(tokenizer), *tokenizer.encode(prompt, add_special_tokens=False)]


def generation_nll(
    model: nn.Module, prefix: list[int], gens: Sequence[Generation], device: torch.device
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the generated tokens given ``prefix``, and
    how many tokens that is, under ``model`` (a plain LM or a codebook model)."""
    import torch
    import torch.nn.functional as F

    rows = [g.ids for g in gens if g.ids]
    if not rows:
        return 0.0, 0
    width = len(prefix) + max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)  # tokens to score
    for i, r in enumerate(rows):
        seq = prefix + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(prefix) : len(seq)] = True
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        # Right padding never reaches a scored token in a causal model.
        logits = model(input_ids=ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:]
    return float(nll[m].sum()), int(m.sum())


def sample_condition(
    model: CodebookModel,
    tokenizer: Any,
    ppl_model: nn.Module | None,
    spec: InterventionSpec | None,
    prompts: Sequence[str],
    cfg: TopicsConfig,
    *,
    samples_per_prompt: int,
) -> tuple[list[tuple[int, Generation]], float, int]:
    """Samples from every prompt under ``spec`` (seed ``cfg.seed`` + prompt index, so the
    conditions are paired), with the summed NLL of the generated tokens and their number under
    ``ppl_model`` (``None``: the codebook model with its codebooks off)."""
    from codebook_lens.codes.intervene import generate

    device = next(model.parameters()).device
    gens: list[tuple[int, Generation]] = []
    total, count = 0.0, 0
    for pi, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        samples = generate(
            model,
            tokenizer,
            ids,
            spec,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            num_samples=samples_per_prompt,
            seed=cfg.seed + pi,
        )
        gens += [(pi, g) for g in samples]
        if ppl_model is None:
            with model.disabled():
                s, n = generation_nll(model, ids, samples, device)
        else:
            s, n = generation_nll(ppl_model, ids, samples, device)
        total += s
        count += n
    return gens, total, count


def rank_by_effect(
    model: CodebookModel,
    tokenizer: Any,
    base: nn.Module | None,
    cache: CodeCache,
    candidates: Mapping[str, Sequence[TopicCode]],
    cfg: TopicsConfig,
) -> dict[str, list[TopicCode]]:
    """Each topic's candidates with ``effect``/``cost`` measured on contexts sampled from the
    tuning prompts, best effect first; codes that do not raise the topic's words are dropped."""
    topics = list(candidates)
    llr = token_topic_llr(cache, topics, count=cfg.effect_evidence)
    ctx = steering_contexts(
        model,
        tokenizer,
        cfg.tune_prompts,
        per_prompt=cfg.effect_contexts,
        length=cfg.effect_length,
        seed=cfg.seed,
    )
    out = {}
    for i, t in enumerate(topics):
        measured = code_effects(
            model,
            base,
            candidates[t],
            ctx,
            llr[i],
            slot=cfg.slot,
            scale=cfg.scale,
            progress=cfg.progress,
        )
        kept = [c for c in measured if (c.effect or 0.0) > 0.0]
        kept.sort(key=lambda c: (-(c.effect or 0.0), c.codebook, c.head or 0, c.code))
        out[t] = kept
    return out


def choose_setting(points: Sequence[Mapping[str, Any]], max_ratio: float) -> Mapping[str, Any]:
    """The tuning point with the best gain among those whose perplexity ratio is at most
    ``max_ratio`` (ties: lower ratio); the lowest-ratio point when none qualifies."""
    ok = [p for p in points if p["perplexity_ratio"] <= max_ratio]
    if not ok:
        return min(points, key=lambda p: p["perplexity_ratio"])
    return max(ok, key=lambda p: (p["gain"], -p["perplexity_ratio"]))


# -------------------------------------------------------------- experiment
def run_topics(cfg: TopicsConfig) -> dict[str, Any]:
    """Run the whole experiment; writes the report, returns ``metrics.json``'s content."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data and the judge (trained on documents the LM never sees).
    splits = split_corpus(cfg)
    clf = TopicClassifier.fit(
        [d.text for d in splits.classifier_train], [str(d.label) for d in splits.classifier_train]
    )
    clf.save(out / "classifier")
    test_texts = [d.text for d in splits.classifier_test]
    test_labels = [str(d.label) for d in splits.classifier_test]
    heldout_acc = clf.accuracy(test_texts, test_labels)
    # Generations are short: also measure the judge on article openings of similar length.
    snippet_words = max(8, cfg.max_new_tokens * 3 // 4)
    snippets = [" ".join(t.split()[:snippet_words]) for t in test_texts]
    snippet_acc = clf.accuracy(snippets, test_labels)
    topics = clf.labels

    # 2. Model, code cache, topic codes.
    model, tokenizer, base, model_source, cache = prepare_model_and_cache(cfg, splits.lm, out)
    heads = [
        n for n, s in zip(model.codebooks, model.sites, strict=True) if s.placement == "attn_heads"
    ]
    if not heads:
        raise ValueError(
            f"model={model_source}: has no attention-head codebooks (placement 'attn_heads'); "
            f"its codebooks are {list(model.codebooks)}"
        )
    # Candidates: every code that fires mostly in the topic's documents, ranked by where it
    # fires; 'effect' re-ranks them by what they do when forced (on the tuning prompts).
    ranked = {
        t: find_topic_codes(
            cache,
            t,
            n=None,
            max_per_head=10**9,
            min_precision=cfg.min_precision,
            min_count=cfg.min_count,
            codebooks=heads,
        )
        for t in topics
    }
    rankings = {"firing": ranked}
    if cfg.selection in ("effect", "both"):
        rankings["effect"] = rank_by_effect(model, tokenizer, base, cache, ranked, cfg)
    if cfg.selection == "effect":
        del rankings["firing"]
    pools = {
        r: {t: cap_per_head(rk[t], None, cfg.max_codes_per_head) for t in topics}
        for r, rk in rankings.items()
    }
    first = next(iter(pools))
    setting: dict[str, dict[str, Any]] = {
        t: {"ranking": first, "codes": cfg.codes_per_topic, "scale": cfg.scale} for t in topics
    }

    # 3a. Tuning sweep on the tuning prompts only: gain and perplexity per (codes, scale).
    tuning: dict[str, Any] | None = None
    if cfg.tune_codes:
        scales = cfg.tune_scales or [cfg.scale]
        bar = tqdm(
            total=(1 + len(topics) * len(pools) * len(cfg.tune_codes) * len(scales))
            * len(cfg.tune_prompts),
            desc="tune",
            disable=not cfg.progress,
        )

        def tune_run(spec: InterventionSpec | None) -> tuple[list[str], float | None]:
            g, s_, n_ = sample_condition(
                model,
                tokenizer,
                base,
                spec,
                cfg.tune_prompts,
                cfg,
                samples_per_prompt=cfg.tune_samples_per_prompt,
            )
            bar.update(len(cfg.tune_prompts))
            return [x.text or "" for _, x in g], (math.exp(s_ / n_) if n_ else None)

        base_texts, base_ppl = tune_run(None)
        base_pred = clf.predict(base_texts)
        tuning = {
            "prompts": list(cfg.tune_prompts),
            "samples_per_prompt": cfg.tune_samples_per_prompt,
            "baseline_perplexity": base_ppl,
            "topics": {},
        }
        for t in topics:
            rate0 = sum(p == t for p in base_pred) / len(base_pred)
            points = []
            for r, pool in pools.items():
                for n_codes in cfg.tune_codes:
                    for sc in scales:
                        if not pool[t]:
                            bar.update(len(cfg.tune_prompts))
                            continue
                        texts_t, p = tune_run(
                            steering_spec(pool[t][:n_codes], slot=cfg.slot, scale=sc)
                        )
                        pred = clf.predict(texts_t)
                        rate = sum(x == t for x in pred) / len(pred)
                        points.append(
                            {
                                "ranking": r,
                                "codes": min(n_codes, len(pool[t])),
                                "scale": sc,
                                "steered_rate": rate,
                                "gain": rate - rate0,
                                "perplexity": p,
                                "perplexity_ratio": (p / base_ppl) if p and base_ppl else math.inf,
                            }
                        )
            chosen = choose_setting(points, cfg.max_perplexity_ratio) if points else None
            tuning["topics"][t] = {"baseline_rate": rate0, "points": points, "chosen": chosen}
            if chosen is not None:
                setting[t] = {
                    "ranking": str(chosen["ranking"]),
                    "codes": int(chosen["codes"]),
                    "scale": float(chosen["scale"]),
                }
        bar.close()
    topic_codes = {
        t: pools[str(setting[t]["ranking"])][t][: int(setting[t]["codes"])] for t in topics
    }

    # 3b. Evaluation prompts (never used above): without and with steering, paired seeds.
    spec: InterventionSpec | None
    conditions: list[str | None] = [None, *topics]
    gens: dict[str | None, list[tuple[int, Generation]]] = {c: [] for c in conditions}
    nll: dict[str | None, list[float]] = {c: [0.0, 0.0] for c in conditions}
    bar = tqdm(total=len(conditions), desc="generate", disable=not cfg.progress)
    for cond in conditions:
        spec = None
        if cond is not None:
            if not topic_codes[cond]:
                bar.update(1)
                continue
            spec = steering_spec(topic_codes[cond], slot=cfg.slot, scale=setting[cond]["scale"])
            # Saved so the steering replays from the shell: codebook-lens generate ... --intervene
            (out / "specs").mkdir(exist_ok=True)
            spec.save(out / "specs" / f"{cond}.yaml")
        g, s_, n_ = sample_condition(
            model,
            tokenizer,
            base,
            spec,
            cfg.prompts,
            cfg,
            samples_per_prompt=cfg.samples_per_prompt,
        )
        gens[cond] = g
        nll[cond] = [s_, float(n_)]
        bar.update(1)
    bar.close()

    # 4. Judge.
    def texts(cond: str | None) -> list[str]:
        return [g.text or "" for _, g in gens[cond]]

    baseline_pred = clf.predict(texts(None))

    def ppl(cond: str | None) -> float | None:
        s, n = nll[cond]
        return math.exp(s / n) if n else None

    metrics: dict[str, Any] = {
        "classifier": {
            "kind": "multinomial naive Bayes on lower-cased words, uniform prior",
            "heldout_accuracy": heldout_acc,
            "snippet_accuracy": snippet_acc,
            "snippet_words": snippet_words,
            "train_docs": len(splits.classifier_train),
            "test_docs": len(splits.classifier_test),
        },
        "model": model_source,
        "lm_docs": len(splits.lm),
        "cache_tokens": cache.n_tokens,
        "baseline": {
            "samples": len(baseline_pred),
            "perplexity": ppl(None),
            "predicted": {t: baseline_pred.count(t) for t in topics},
            "no_known_word": baseline_pred.count(None),
        },
        "topics": {},
    }
    for t in topics:
        pred = clf.predict(texts(t))
        steered = sum(p == t for p in pred) / len(pred) if pred else 0.0
        base_rate = sum(p == t for p in baseline_pred) / len(baseline_pred)
        metrics["topics"][t] = {
            "baseline_rate": base_rate,
            "steered_rate": steered,
            "gain": steered - base_rate,
            "samples": len(pred),
            "baseline_samples": len(baseline_pred),
            "steered_perplexity": ppl(t),
            "perplexity_ratio": ratio(ppl(t), ppl(None)),
            "setting": setting[t],
            "codes": [asdict(c) for c in topic_codes[t]],
        }
    gains = [m["gain"] for m in metrics["topics"].values()]
    ratios = [m["perplexity_ratio"] for m in metrics["topics"].values()]
    metrics["target"] = {
        "topics_with_gain_ge_30pts": sum(g >= 0.30 for g in gains),
        "needed": 3,
        "met": sum(g >= 0.30 for g in gains) >= 3,
    }
    fluent = sum(r is not None and r <= cfg.max_perplexity_ratio for r in ratios)
    metrics["target_every_topic"] = {
        "topics": len(topics),
        "topics_with_gain_ge_30pts": sum(g >= 0.30 for g in gains),
        "topics_within_perplexity_ratio": fluent,
        "max_perplexity_ratio": cfg.max_perplexity_ratio,
        "met": all(g >= 0.30 for g in gains) and fluent == len(topics),
    }
    metrics["selection"] = cfg.selection
    metrics["evaluation_prompts"] = list(cfg.prompts)
    metrics["tuning_prompts"] = list(cfg.tune_prompts)
    metrics["tuning"] = tuning
    metrics["config"] = asdict(cfg)
    metrics["seconds"] = time.perf_counter() - started
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(
        out / "generations.json",
        {
            str(c): [{"prompt": cfg.prompts[pi], "text": g.text} for pi, g in gens[c]]
            for c in conditions
        },
    )
    write_topics_report(cfg, metrics, clf, gens, out)
    return metrics


def write_topics_report(
    cfg: TopicsConfig,
    metrics: dict[str, Any],
    clf: TopicClassifier,
    gens: dict[str | None, list[tuple[int, Generation]]],
    out: Path,
) -> Path:
    """report.md + report.html + topics_chart.png (via ``report.Report``)."""
    import matplotlib.pyplot as plt

    from codebook_lens.report import Report

    topics = list(metrics["topics"])
    clf_m = metrics["classifier"]
    rep = Report("Topic steering with codebook features")
    if cfg.selection in ("effect", "both"):
        ranking = (
            ("ranked by where they fire AND, separately, " if cfg.selection == "both" else "")
            + "re-ranked by what each does when forced alone (slot "
            f"'{cfg.slot}', scale {cfg.scale}) on {cfg.effect_contexts} unsteered samples of "
            f"{cfg.effect_length} tokens from each tuning prompt: the rise of the next token's "
            "expected log-likelihood ratio of the topic against the other topics (token counts "
            "of the cache's documents); codes that do not raise it are dropped"
            + ("; the sweep keeps the better ranking per topic" if cfg.selection == "both" else "")
        )
    else:
        ranking = "ranked by precision x the fraction of the topic's documents they fire in"
    if metrics.get("tuning"):
        how_many = (
            "the number of forced codes and their scale are chosen per topic on the tuning "
            "prompts (best gain with perplexity <= "
            f"{cfg.max_perplexity_ratio}x the unsteered; see the trade-off below)"
        )
    else:
        how_many = f"the best {cfg.codes_per_topic} are forced at scale {cfg.scale}"
    rep.paragraph(
        f"Model: {metrics['model']} (codebooks on every attention head), trained on "
        f"{metrics['lm_docs']} {cfg.data} documents. Topic codes were searched in a code cache of "
        f"{metrics['cache_tokens']:,} tokens of those documents: codes whose firings land in the "
        f"topic's documents at least {cfg.min_precision:.0%} of the time, {ranking}; {how_many} "
        f"(at most {cfg.max_codes_per_head} per head, slot '{cfg.slot}', every position) while "
        f"sampling {cfg.max_new_tokens} tokens from each of {len(cfg.prompts)} neutral "
        f"evaluation prompts x {cfg.samples_per_prompt} samples (temperature {cfg.temperature}, "
        f"top-k {cfg.top_k}); the unsteered samples use the same prompts and seeds."
    )
    rep.paragraph(
        "Evaluation prompts (never used to choose anything): "
        + ", ".join(repr(p) for p in metrics.get("evaluation_prompts", cfg.prompts))
        + ". Tuning prompts (code effects and the tuning sweep only): "
        + ", ".join(repr(p) for p in metrics.get("tuning_prompts", cfg.tune_prompts))
        + "."
    )
    rep.paragraph(
        f"Judge: {clf_m['kind']}, trained on {clf_m['train_docs']} held-out articles the LM never "
        f"saw; accuracy on {clf_m['test_docs']} other held-out articles: "
        f"{clf_m['heldout_accuracy']:.1%} (whole articles), {clf_m['snippet_accuracy']:.1%} "
        f"(first {clf_m['snippet_words']} words, about the length of a generation). A generation "
        "is on-topic when the judge's most likely topic is the steered topic."
    )
    rows = []
    for t in topics:
        m = metrics["topics"][t]
        r = m.get("perplexity_ratio")
        rows.append(
            {
                "topic": t,
                "ranking": m.get("setting", {}).get("ranking", cfg.selection),
                "codes": len(m["codes"]),
                "scale": m.get("setting", {}).get("scale", cfg.scale),
                "unsteered on-topic": f"{m['baseline_rate']:.0%}",
                "steered on-topic": f"{m['steered_rate']:.0%}",
                "gain (points)": f"{100 * m['gain']:+.0f}",
                "samples": m["samples"],
                "perplexity (steered)": m["steered_perplexity"],
                "x unsteered": "n/a" if r is None else f"{r:.2f}",
            }
        )
    target = metrics["target"]
    rep.table(rows, caption="On-topic rate without and with steering")
    base_ppl = metrics["baseline"]["perplexity"]
    rep.paragraph(
        f"Fluency: perplexity of the generations under the base model without codebooks is "
        f"{format_ppl(base_ppl)} for the unsteered samples ({metrics['baseline']['samples']} "
        "samples); the last column gives it for each steered set. "
        f"Target (>= 30 points gain for >= 3 of 5 topics): {target['topics_with_gain_ge_30pts']} "
        f"topics reach it -> {'met' if target['met'] else 'NOT met'}."
    )
    every = metrics.get("target_every_topic")
    if every:
        rep.paragraph(
            f"Target (every topic >= +30 points and perplexity <= {every['max_perplexity_ratio']}x "
            f"the unsteered): {every['topics_with_gain_ge_30pts']}/{every['topics']} topics gain "
            f">= 30 points, {every['topics_within_perplexity_ratio']}/{every['topics']} stay "
            f"within the perplexity bound -> {'met' if every['met'] else 'NOT met'}."
        )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(topics))
    ax.bar(x - 0.2, [metrics["topics"][t]["baseline_rate"] for t in topics], 0.4, label="unsteered")
    ax.bar(x + 0.2, [metrics["topics"][t]["steered_rate"] for t in topics], 0.4, label="steered")
    ax.set_xticks(x, topics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("on-topic rate")
    ax.legend()
    rep.figure(fig, "topics_chart", caption="Fraction of generations judged on-topic")
    tuning = metrics.get("tuning")
    if tuning:
        rep.heading("Trade-off: gain against perplexity (tuning prompts)")
        fig, ax = plt.subplots(figsize=(7, 4.2))
        tune_rows = []
        styles = ["-", "--", ":", "-."]
        for ti, t in enumerate(topics):
            pts = tuning["topics"][t]["points"]
            if not pts:
                continue
            names = sorted({str(p.get("ranking", cfg.selection)) for p in pts})
            for si, sc in enumerate(sorted({p["scale"] for p in pts})):
                for ri, r in enumerate(names):
                    line = sorted(
                        (
                            p
                            for p in pts
                            if p["scale"] == sc and p.get("ranking", cfg.selection) == r
                        ),
                        key=lambda p: p["codes"],
                    )
                    ax.plot(
                        [p["perplexity_ratio"] for p in line],
                        [100 * p["gain"] for p in line],
                        marker="os^"[ri % 3],
                        markersize=3,
                        color=f"C{ti % 10}",
                        ls=styles[si % len(styles)],
                        label=f"{t}, scale {sc:g}" + (f", {r}" if len(names) > 1 else ""),
                    )
            chosen = tuning["topics"][t]["chosen"]
            if chosen is not None:
                ax.plot(
                    [chosen["perplexity_ratio"]],
                    [100 * chosen["gain"]],
                    marker="*",
                    markersize=12,
                    color=f"C{ti % 10}",
                )
            for p in pts:
                tune_rows.append(
                    {
                        "topic": t,
                        "ranking": p.get("ranking", cfg.selection),
                        "codes": p["codes"],
                        "scale": p["scale"],
                        "gain (points)": f"{100 * p['gain']:+.0f}",
                        "perplexity": p["perplexity"],
                        "x unsteered": f"{p['perplexity_ratio']:.2f}",
                        "chosen": "yes" if p == tuning["topics"][t]["chosen"] else "",
                    }
                )
        ax.axhline(30, color="grey", ls="--", lw=0.8)
        ax.axvline(cfg.max_perplexity_ratio, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity / unsteered perplexity (log scale)")
        ax.set_ylabel("gain in on-topic rate (points)")
        ax.legend(fontsize=6, ncol=2)
        rep.figure(
            fig,
            "topics_tradeoff",
            caption="Each line: one topic (colour) and scale (line style), points = more forced "
            f"codes; star = the setting chosen (tuning prompts, {tuning['samples_per_prompt']} "
            "samples per prompt)",
        )
        rep.table(
            tune_rows,
            caption=f"Tuning sweep (unsteered perplexity {format_ppl(tuning['baseline_perplexity'])})",
        )
    rep.heading("Topic codes")
    code_rows = []
    for t in topics:
        for c in metrics["topics"][t]["codes"][:5]:
            head = "" if c["head"] is None else f" head {c['head']}"
            code_rows.append(
                {
                    "topic": t,
                    "code": f"{c['codebook']}{head} #{c['code']}",
                    "precision": c["precision"],
                    "doc coverage": c["coverage"],
                    "fires on tokens": c["count"],
                }
            )
    rep.table(code_rows, caption="Best 5 codes per topic")
    rep.heading("Samples")
    for cond in [None, *topics]:
        shown = [g.text or "" for _, g in gens[cond][:3]]
        label = "unsteered" if cond is None else f"steered to {cond}"
        judged = clf.predict(shown)
        lines = [
            f"[{j or '-'}] {cfg.prompts[pi]}{g.text or ''}".replace("\n", " ")
            for (pi, g), j in zip(gens[cond][:3], judged, strict=True)
        ]
        rep.heading(label, level=3)
        rep.code("\n".join(textwrap_lines(lines)))
    rep.paragraph(
        "Judge's top words per topic: "
        + "; ".join(f"{t}: {', '.join(clf.top_words(t, 6))}" for t in topics)
        + "."
    )
    rep.paragraph(
        "Replay a topic's steering from the shell: codebook-lens generate "
        f'{metrics["model"].removesuffix(" (reused)")} "The" --intervene '
        f"{out / 'specs' / (topics[0] + '.yaml')} --n 5 (one spec per topic in specs/)."
    )
    rep.paragraph(f"Run time: {metrics['seconds']:.0f} s. Full settings in metrics.json.")
    return rep.write(out)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_ppl(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def textwrap_lines(lines: list[str], width: int = 110) -> list[str]:
    import textwrap

    out: list[str] = []
    for line in lines:
        out += textwrap.wrap(line, width, subsequent_indent="    ") or [""]
    return out
