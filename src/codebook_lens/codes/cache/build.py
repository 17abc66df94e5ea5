"""Building a cache: run a codebook model over documents once, keep every token's codes.

SAEs (``dictionaries=``) are stored as codebooks too: each token's top-k latents and their
activations (see ``format``), from the same forward pass; the model may then be a plain Hugging
Face causal LM without codebooks.

Documents are cut into windows of ``seq_len`` tokens from the document start, run in batches,
and written through ``CacheWriter`` with a checkpoint every ``chunk_tokens`` tokens. With
``shard=(i, n)`` the build writes shard ``i`` of ``n`` (a contiguous run of the documents).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from codebook_lens import threads
from codebook_lens.codes.cache.format import CodebookInfo, DocumentLike, partial_path
from codebook_lens.codes.cache.identity import model_identity
from codebook_lens.codes.cache.reader import CodeCache
from codebook_lens.codes.cache.shards import check_shard, shard_name
from codebook_lens.codes.cache.writer import CacheWriter, merge_shards
from codebook_lens.flags import flag

if TYPE_CHECKING:
    from codebook_lens.codes.saes.model import DictionaryModel
    from codebook_lens.model.codebook_model import CodebookModel

    Model = CodebookModel | DictionaryModel

DEFAULT_CHUNK_TOKENS = 1 << 18
"""Tokens between two build checkpoints (what an interrupted build can lose)."""


@dataclass
class CacheConfig:
    """What the ``cache`` command runs over and how it writes the cache (its flags)."""

    data: str = field(default="", metadata=flag(required=True))
    """Text source: a file, a folder, 'bbc', ..."""
    out: str = field(default="", metadata=flag(required=True))
    """Cache folder to create."""
    tokens: int = 100_000
    """Tokens to cache."""
    tokenizer: str | None = None
    """Tokenizer (None: the model folder's)."""
    seq_len: int | None = None
    """Window length (None: the model's maximum)."""
    batch_size: int = 8
    """Windows per forward pass."""
    device: str | None = None
    """e.g. cuda (None: cpu)."""
    overwrite: bool = field(default=False, metadata=flag(switch=True))
    """Replace an existing cache folder."""
    codebooks: list[str] | None = field(default=None, metadata=flag(nargs="+", metavar="GLOB"))
    """Store only the codebooks matching these globs, e.g. 'layers.1[0-5].*' (None: all)."""
    index: list[str] = field(
        default_factory=lambda: ["all"], metadata=flag(nargs="+", metavar="all|none|GLOB")
    )
    """Codebooks that get an inverted index; without one, finding where a code fires scans
    the codes (search itself needs no index)."""
    resume: bool = field(default=False, metadata=flag(switch=True))
    """Continue an interrupted build of OUT."""
    shards: int | None = None
    """Split the documents over N shards (None: torchrun's WORLD_SIZE, else 1)."""
    shard: int | None = None
    """The shard to write, 0 .. N-1 (None: RANK)."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """Tokens between checkpoints."""

    def build_options(self) -> dict[str, Any]:
        """``build_cache``'s keywords for these settings (all but the shard)."""
        names = ("seq_len", "batch_size", "overwrite", "codebooks", "index", "resume")
        return {
            "max_tokens": self.tokens,
            "source": self.data,
            "chunk_tokens": self.chunk_tokens,
            **{n: getattr(self, n) for n in names},
        }


def select_codebooks(
    names: Sequence[str], globs: Sequence[str] | None, what: str = "codebooks"
) -> list[str]:
    """The ``names`` matching any of ``globs`` (fnmatch), in their own order; ``None`` = all.

    A glob that matches nothing raises ``ValueError`` listing the names there are.
    """
    if globs is None:
        return list(names)
    if isinstance(globs, str):
        globs = [globs]
    for g in globs:
        if not isinstance(g, str) or not g:
            raise ValueError(f"{what}={list(globs)!r} is invalid; give codebook names or globs")
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            shown = ", ".join(list(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"{what}: the glob {g!r} matches no codebook; the model has {shown}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def select_index(spec: str | Sequence[str] | bool, names: Sequence[str]) -> list[str]:
    """Codebooks that get an inverted index: ``"all"`` (or True), ``"none"`` (or False) or
    globs over ``names``."""
    if (
        spec is True
        or spec == "all"
        or (not isinstance(spec, str | bool) and list(spec) == ["all"])
    ):
        return list(names)
    if (
        spec is False
        or spec == "none"
        or (not isinstance(spec, str | bool) and list(spec) == ["none"])
    ):
        return []
    globs = [spec] if isinstance(spec, str) else list(spec)  # type: ignore[arg-type]
    if any(g in ("all", "none") for g in globs):
        raise ValueError(f"index={globs!r} is invalid; give 'all', 'none' or codebook globs")
    return select_codebooks(names, globs, what="index")


def interleave_labels(documents: Iterable[DocumentLike]) -> list[DocumentLike]:
    """Documents taking turns over labels (in order within each label), so that a cache cut
    at N tokens holds every label of a corpus stored topic by topic (e.g. BBC)."""
    groups: dict[str | None, list[DocumentLike]] = {}
    for d in documents:
        groups.setdefault(getattr(d, "label", None), []).append(d)
    out: list[DocumentLike] = []
    lists = list(groups.values())
    for i in range(max((len(g) for g in lists), default=0)):
        out.extend(g[i] for g in lists if i < len(g))
    return out


def _vocab_strings(tokenizer: Any) -> list[str]:
    n = len(tokenizer)
    return [str(s) for s in tokenizer.batch_decode([[i] for i in range(n)])]


def _codebook_infos(model: Model) -> list[CodebookInfo]:
    inner = getattr(model, "inner", model)
    sites = getattr(inner, "sites", []) if hasattr(inner, "codebooks") else []
    out = []
    for s in sites:
        layer = inner.codebooks[s.name]
        shape = {a: getattr(layer, a) for a in ("groups", "grouped", "k", "num_codes", "dim")}
        out.append(CodebookInfo(name=s.name, placement=s.placement, layer=s.layer, **shape))
    return out + _sae_infos(model)


def _sae_infos(model: Model) -> list[CodebookInfo]:
    """An SAE codebook for each of the model's dictionaries (none without)."""
    from codebook_lens.codes.saes.model import DictionaryModel

    if not isinstance(model, DictionaryModel):
        return []
    out = []
    for name, d in model.dictionaries.items():
        site = model.dictionary_sites[name]
        out.append(
            CodebookInfo(
                name=name,
                placement=site.placement,
                layer=site.layer,
                groups=1,
                grouped=False,
                k=model.k[name],
                num_codes=d.num_latents,
                dim=d.d_in,
                kind=d.kind,
                site={"name": site.name, "module": site.module, "hook": site.hook},
                source=str(getattr(d, "source", "") or ""),
                values="float32",
            )
        )
    return out


def _as_model(
    model: Any, dictionaries: Sequence[Any] | Mapping[str, Any] | None, sae_k: int | None
) -> Model:
    """``model`` with ``dictionaries`` read at their sites (a ``DictionaryModel``) if given."""
    from codebook_lens.codes.saes.model import DictionaryModel
    from codebook_lens.model.codebook_model import CodebookModel

    if dictionaries:
        if isinstance(model, DictionaryModel):
            raise ValueError(
                "model already reads SAEs (a DictionaryModel); leave dictionaries=None"
            )
        return DictionaryModel(model, dictionaries, k=sae_k)
    if not isinstance(model, CodebookModel | DictionaryModel):
        raise ValueError(
            f"model is a {type(model).__name__} without codebooks; give a CodebookModel, or "
            "SAEs to cache from it (dictionaries=[...], --sae PATH)"
        )
    return model


def _shard_plan(
    tokenizer: Any, documents: Sequence[DocumentLike], max_tokens: int, shard: tuple[int, int]
) -> list[tuple[DocumentLike, int]]:
    """This shard's ``(document, tokens kept)``: the documents an unsharded build would take
    (in order, the last one cut at ``max_tokens``), split into ``n`` contiguous runs of about
    equal tokens; a document goes to the shard its first token falls in."""
    i, n = shard
    kept: list[tuple[int, int]] = []
    total = 0
    block = 256
    for b in range(0, len(documents), block):
        texts = [d.text for d in documents[b : b + block]]
        for j, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            take = min(len(ids), max_tokens - total)
            if take > 0:
                kept.append((b + j, take))
                total += take
        if total >= max_tokens:
            break
    if not kept:
        return []
    lengths = np.array([t for _, t in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = starts * n // int(lengths.sum())
    return [(documents[d], t) for (d, t), o in zip(kept, owner, strict=True) if o == i]


def build_cache(
    model: Model | Any,
    tokenizer: Any,
    documents: Iterable[DocumentLike],
    out: str | os.PathLike[str],
    *,
    max_tokens: int = 100_000,
    seq_len: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    source: str = "",
    codebooks: Sequence[str] | None = None,
    index: str | Sequence[str] | bool = "all",
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dictionaries: Sequence[Any] | Mapping[str, Any] | None = None,
    sae_k: int | None = None,
) -> CodeCache:
    """Run ``model`` over ``documents`` and write a cache of at most ``max_tokens`` tokens.

    Args:
        model: a ``CodebookModel``, a ``DictionaryModel``, or with ``dictionaries`` a plain
            Hugging Face causal LM (its device is used; it is put in eval mode meanwhile).
        tokenizer: a Hugging Face *fast* tokenizer (character offsets come from it).
        documents: objects with ``.id``, ``.text`` and ``.label``.
        out: the cache folder (written to a hidden partial folder, renamed at the end).
        max_tokens: stop after this many tokens (the last document is cut).
        seq_len: window length; default the model's maximum positions (at most 1024).
        batch_size: windows per forward pass.
        codebooks: globs over the model's codebook names to store (default all).
        index: which stored codebooks get an inverted index: ``"all"``, ``"none"`` or globs.
        resume: continue an interrupted build of ``out`` from its last checkpoint (same
            settings); the result is byte-identical to an uninterrupted build. Without a
            checkpoint it starts afresh; on a complete cache it returns it.
        shard: ``(i, n)``: write shard ``i`` of ``n`` into ``out/shard-...``; every shard
            takes a contiguous run of the documents an unsharded build would take, and the
            shards together open as that cache (``out/manifest.json`` is written by the shard
            that completes the set).
        chunk_tokens: tokens between checkpoints.
        dictionaries: SAEs (sparsify, SAELens; ``codes.saes.load_saes``) stored as codebooks
            ``sae.<site>`` (see ``codes.saes.model``), by name or as a list.
        sae_k: latents kept per token for SAEs without a fixed ``k``.
    """
    model = _as_model(model, dictionaries, sae_k)
    _check_build_args(tokenizer, max_tokens=max_tokens, chunk_tokens=chunk_tokens, shard=shard)
    seq_len = _window_length(model, seq_len)
    infos, omitted = _stored_codebooks(model, codebooks, index)
    root = Path(out)
    target = root / shard_name(*shard) if shard else root
    if resume and (target / "manifest.json").is_file() and not partial_path(target).exists():
        done = CodeCache(target)  # finished before: nothing to do
        if shard:
            _maybe_merge(root)
        return done
    if shard and (root / "manifest.json").is_file() and overwrite:
        (root / "manifest.json").unlink()  # a shard is rebuilt: the old merge is stale
    items = _planned_documents(tokenizer, documents, max_tokens, shard, source)
    build = {
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "source": source,
        "codebook_globs": list(codebooks) if codebooks is not None else None,
        "index": index if isinstance(index, str | bool) else list(index),
    }
    writer = _open_writer(
        model, tokenizer, target, infos, omitted, build, seq_len, overwrite, resume, shard
    )
    budget = max_tokens if shard is None else sum(t for _, t in items)  # type: ignore[misc]
    settings = _Settings(max_tokens, seq_len, batch_size, chunk_tokens, source)
    cache = _encode(model, tokenizer, items, writer, settings, budget=budget, progress=progress)
    if shard:
        _maybe_merge(root)
    return cache


def _stored_codebooks(
    model: Model, codebooks: Sequence[str] | None, index: str | Sequence[str] | bool
) -> tuple[list[CodebookInfo], list[str]]:
    """``(codebooks to store, marked indexed or not; names of the model's others)``."""
    all_infos = _codebook_infos(model)
    stored = select_codebooks([c.name for c in all_infos], codebooks, what="codebooks")
    indexed = set(select_index(index, stored))
    infos = [c for c in all_infos if c.name in stored]
    for c in infos:
        c.indexed = c.name in indexed
    return infos, [c.name for c in all_infos if c.name not in stored]


def _open_writer(
    model: Model,
    tokenizer: Any,
    target: Path,
    infos: list[CodebookInfo],
    omitted: list[str],
    build: dict[str, Any],
    seq_len: int,
    overwrite: bool,
    resume: bool,
    shard: tuple[int, int] | None,
) -> CacheWriter:
    names = {c.name for c in infos}
    return CacheWriter(
        target,
        codebooks=infos,
        identity=model_identity(model),
        vocab=_vocab_strings(tokenizer),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        seq_len=seq_len,
        vectors=_vectors(model, names),
        extra={"source": build["source"], "max_tokens": build["max_tokens"]},
        overwrite=overwrite,
        resume=resume,
        build=build,
        omitted=omitted,
        shard=shard,
    )


def _vectors(model: Model, names: set[str]) -> dict[str, np.ndarray]:
    """``{name: (groups, num_codes, head_dim)}``: code vectors, or an SAE's decoder rows."""
    out = {
        name: layer.codebook.detach().float().cpu().numpy()
        for name, layer in model.codebooks.items()
        if name in names
    }
    for name, d in getattr(model, "dictionaries", {}).items():
        if name in names:
            out[name] = d.W_dec.detach().float().cpu().numpy()[None]
    return out


class _Settings(NamedTuple):
    max_tokens: int
    seq_len: int
    batch_size: int
    chunk_tokens: int
    source: str


def _check_build_args(
    tokenizer: Any, *, max_tokens: int, chunk_tokens: int, shard: tuple[int, int] | None
) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; it must be an integer >= 1")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid; it must be an integer >= 1")
    check_shard(shard)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; the cache needs "
            "character offsets (return_offsets_mapping), which only fast tokenizers give"
        )


def _window_length(model: Model, seq_len: int | None) -> int:
    """``seq_len``, or by default the model's maximum positions (at most 1024)."""
    base_cfg = getattr(model.base, "config", None)
    if seq_len is None:
        seq_len = min(
            int(
                getattr(base_cfg, "max_position_embeddings", 0)
                or getattr(base_cfg, "n_positions", 0)
                or 1024
            ),
            1024,
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid; it must be an integer >= 1")
    return seq_len


def _planned_documents(
    tokenizer: Any,
    documents: Iterable[DocumentLike],
    max_tokens: int,
    shard: tuple[int, int] | None,
    source: str,
) -> Iterable[tuple[DocumentLike, int | None]]:
    """``(document, tokens to keep)`` in order; ``None``: up to what ``max_tokens`` leaves."""
    if not shard:
        return ((d, None) for d in documents)
    items = _shard_plan(tokenizer, list(documents), max_tokens, shard)
    if not items:
        raise ValueError(
            f"shard {shard[0]} of {shard[1]} gets no documents from "
            f"{source or 'the data'}; use fewer shards"
        )
    return items


class _Batches:
    """Windows waiting for the model, and the documents around them in reading order; a flush
    runs the windows as one batch, then replays documents and windows into the writer."""

    def __init__(self, model: Model, writer: CacheWriter, batch_size: int, bar: Any) -> None:
        self.model, self.writer, self.batch_size, self.bar = model, writer, batch_size, bar
        self.device = next(model.parameters()).device
        self.infos = list(writer.codebooks.values())
        self.queue: list[tuple[Any, ...]] = []
        self.windows: list[np.ndarray] = []
        # Fault-injection aid: crash tests slow each batch down so that kills land mid-build
        # however fast the machine is.
        self.delay = float(os.environ.get("CODEBOOK_LENS_CACHE_BATCH_DELAY", "0") or 0)

    def document(self, doc: DocumentLike) -> None:
        self.queue.append(("doc", doc.id, doc.text, getattr(doc, "label", None)))

    def window(self, tokens: np.ndarray, offsets: np.ndarray) -> bool:
        """Queue a window; ``True`` once a batch is full."""
        self.queue.append(("win", len(self.windows), tokens, offsets))
        self.windows.append(tokens)
        return len(self.windows) >= self.batch_size

    def _run(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Codes and values of every queued window: ``[({name: (len(window), [groups,] k)},
        {SAE name: (len(window), k)})]``."""
        import torch  # reading a cache needs neither torch nor the model code

        from codebook_lens.codes.saes.model import DictionaryModel

        if not self.windows:
            return []
        width = max(len(w) for w in self.windows)
        ids = torch.zeros(len(self.windows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(self.windows):
            ids[i, : len(w)] = torch.from_numpy(w.astype(np.int64))
            mask[i, : len(w)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            if isinstance(self.model, DictionaryModel):
                codes, values = self.model.get_latents(ids, attention_mask=mask)
            else:
                codes, values = self.model.get_codes(ids, attention_mask=mask), {}
        host = {cb.name: _stored_codes(cb, codes[cb.name].cpu().numpy()) for cb in self.infos}
        vals = {cb.name: values[cb.name].cpu().numpy() for cb in self.infos if cb.values}
        return [
            (
                {cb.name: host[cb.name][i, : len(w)] for cb in self.infos},
                {name: v[i, : len(w)] for name, v in vals.items()},
            )
            for i, w in enumerate(self.windows)
        ]

    def flush(self) -> None:
        results = self._run()
        for item in self.queue:
            if item[0] == "doc":
                self.writer.add_document(*item[1:])
            else:
                _, i, toks, offs = item
                self.writer.add_tokens(toks, offs, *results[i])
                self.bar.update(len(toks))
        self.queue.clear()
        self.windows.clear()
        if self.delay > 0:
            time.sleep(self.delay)


def _stored_codes(cb: CodebookInfo, codes: np.ndarray) -> np.ndarray:
    """Codes in the stored dtype; an SAE's unfired slots (``-1``) become ``cb.unfired``."""
    if cb.unfired is not None:
        codes = np.where(codes < 0, cb.unfired, codes)
    return codes.astype(cb.dtype)


def _encode(
    model: Model,
    tokenizer: Any,
    items: Iterable[tuple[DocumentLike, int | None]],
    writer: CacheWriter,
    settings: _Settings,
    *,
    budget: int,
    progress: bool,
) -> CodeCache:
    """Run the model over the documents into ``writer`` (from its checkpoint) and finish it."""
    from codebook_lens.model.codebook_model import eval_mode  # imports torch

    bar = tqdm(
        total=budget, initial=writer.n_tokens, unit="tok", desc="cache", disable=not progress
    )
    batches = _Batches(model, writer, settings.batch_size, bar)
    with eval_mode(model):  # each module's own mode comes back afterwards
        try:
            with writer:
                if writer.phase == "encoding":
                    _encode_documents(tokenizer, items, writer, batches, settings)
                if writer.n_tokens == 0:
                    raise ValueError(
                        f"documents from {settings.source or 'the data'} gave no tokens; "
                        "nothing to cache"
                    )
                bar.close()
                return writer.finish(progress=progress)
        finally:
            bar.close()


def _encode_documents(
    tokenizer: Any,
    items: Iterable[tuple[DocumentLike, int | None]],
    writer: CacheWriter,
    batches: _Batches,
    settings: _Settings,
) -> None:
    """Tokenize, cut into windows and encode the documents not written yet, checkpointing
    every ``chunk_tokens`` tokens."""
    max_tokens, seq_len = settings.max_tokens, settings.seq_len
    cursor = writer.cursor or {"doc": -1, "window": 0, "total": 0}
    total = int(cursor["total"])
    last_checkpoint = writer.n_tokens
    for d_i, (doc, cap) in enumerate(items):
        if d_i < cursor["doc"]:
            continue  # written before the interruption
        if cap is None and total >= max_tokens:
            break
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        keep = max_tokens - total if cap is None else cap
        toks = np.asarray(enc["input_ids"], dtype=np.int32)[:keep]
        if not len(toks):
            continue
        offs = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
        offs = offs[: len(toks)]
        first = 0
        if d_i == cursor["doc"]:
            first = int(cursor["window"])  # this document is open already
        else:
            batches.document(doc)
        threads.tick()
        for s in range(first, len(toks), seq_len):
            if batches.window(toks[s : s + seq_len], offs[s : s + seq_len]):
                batches.flush()
                if writer.n_tokens - last_checkpoint >= settings.chunk_tokens:
                    writer.checkpoint({"doc": d_i, "window": s + seq_len, "total": total})
                    last_checkpoint = writer.n_tokens
        total += len(toks)
    batches.flush()


def _maybe_merge(root: Path) -> CodeCache | None:
    """Write the sharded cache's manifest if every shard is complete (else leave it)."""
    try:
        return merge_shards(root)
    except ValueError:
        return None
