"""The ``pretrain``, ``train`` and ``eval`` commands, each one pass through the stages.

Each stage is called once: data (``data.training_data``: documents, split, tokenizer, blocks,
a ready batch stream) -> build (``models.build_model``) -> train (``train.train``) -> evaluate
(``evaluate.evaluate`` on the whole validation split) -> save (``OUT/model``, in one swap).
``pretrain`` runs them in that order: its tokenizer is trained on the data and its model sized
for that tokenizer. ``train`` reads and splits the corpus (``data.load_split``), then builds
(the base model with codebooks attached), then makes the stream with the base's tokenizer: a
bad corpus fails before a model is loaded, and codebooks that do not fit the model fail before
any text is tokenized.
Every input is checked before anything is written; a bad one raises ``ValueError`` /
``FileNotFoundError`` naming it (``cli.main`` prints it and exits 2).

A run folder ``OUT`` holds ``run_config.json`` (command, data source, every config),
``tokenizer/``, ``checkpoints/``, ``metrics.jsonl`` and finally ``model/``, so ``--resume``
needs nothing but ``OUT``. ``eval`` reads a model folder (or run folder) and its saved data
settings, so by default it scores the validation split held out in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import yaml
from torch import nn

from codebook_lens.config import config_from_dict, read_json, replace_dir_atomic, write_json_atomic
from codebook_lens.model.codebook_model import CONFIG_NAME, CodebookModel, attach_codebooks
from codebook_lens.model.config import CodebookConfig
from codebook_lens.model.distributed import rank_world
from codebook_lens.model.tokenizer import load_tokenizer
from codebook_lens.training.base_models import (
    MODEL_DIR,
    ModelConfig,
    build_model,
    load_base_model,
    resolve_model_path,
)
from codebook_lens.training.data import (
    DataConfig,
    Document,
    Split,
    TrainingData,
    check_block_size,
    fixed_batches,
    load_documents,
    load_split,
    pack_tokens,
    split_documents,
    training_data,
)
from codebook_lens.training.evaluate import evaluate, format_table
from codebook_lens.training.loop import (
    Batches,
    Callback,
    TrainConfig,
    TrainResult,
    seed_everything,
    train,
)

RUN_CONFIG = "run_config.json"


# ------------------------------------------- base model -> codebook model -> fine-tune
class StopTraining(Exception):
    """Raised by a ``train`` callback to end training early (a stop criterion was met)."""


class Trained(NamedTuple):
    """A trained model and how its training went."""

    model: nn.Module
    """The model (trained in place)."""
    result: TrainResult | None
    """``train``'s result; None when a callback stopped it early (``StopTraining``)."""
    history: list[dict[str, Any]]
    """Every metrics record written, up to the stop."""


def build_base(cfg: ModelConfig, tokenizer: Any, *, seed: int) -> nn.Module:
    """A randomly initialised base LM of ``cfg`` for ``tokenizer`` (or a ``Vocab``), seeded by
    ``seed`` (every RNG)."""
    seed_everything(seed)
    return build_model(cfg, tokenizer)


def with_codebooks(base: nn.Module, cfg: CodebookConfig, *, seed: int | None = None) -> nn.Module:
    """``base`` with ``cfg``'s codebooks attached (``seed`` overrides ``cfg.seed``); a
    ``CodebookModel`` is returned as it is, to continue training with its own codebooks."""
    if isinstance(base, CodebookModel):
        return base
    return attach_codebooks(base, cfg if seed is None else dataclasses.replace(cfg, seed=seed))


def fit(
    model: nn.Module,
    batches: Batches,
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    callbacks: Sequence[Callback] = (),
    device: torch.device | str | None = None,
    **train_options: Any,
) -> Trained:
    """``train`` ``model`` (moved to ``device`` first, if given) on ``batches`` into ``out``; a
    callback may end it early by raising ``StopTraining`` (the history then ends there).
    ``train_options`` go to ``train`` (``eval_batches``, ``resume``)."""
    if device is not None:
        model.to(device)
    history: list[dict[str, Any]] = []
    hooks: list[Callback] = [lambda step, rec: history.append(rec), *callbacks]
    try:
        result = train(model, batches, cfg, out, callbacks=hooks, **train_options)
    except StopTraining:
        return Trained(model, None, history)
    return Trained(model, result, history)


def pretrain_base(
    cfg: ModelConfig,
    tokenizer: Any,
    batches: Batches,
    train_cfg: TrainConfig,
    out: str | os.PathLike[str],
    **fit_options: Any,
) -> Trained:
    """Pretrain a base LM of ``cfg`` from scratch (seeded by ``train_cfg.seed``); the
    keyword options go to ``fit``."""
    base = build_base(cfg, tokenizer, seed=train_cfg.seed)
    return fit(base, batches, train_cfg, out, **fit_options)


def fine_tune_codebooks(
    base: nn.Module,
    cfg: CodebookConfig,
    batches: Batches,
    train_cfg: TrainConfig,
    out: str | os.PathLike[str],
    **fit_options: Any,
) -> Trained:
    """Attach ``cfg``'s codebooks to ``base`` (in place) and fine-tune; options go to ``fit``."""
    return fit(with_codebooks(base, cfg), batches, train_cfg, out, **fit_options)


# ----------------------------------------------------------- the commands' configs
@dataclass
class RunConfig:
    """One ``pretrain`` / ``train`` run: its folder, its corpus and its stages' configs."""

    out: str
    """The run folder (``--out``)."""
    data: str | None = None
    """The corpus (``--data``); None: the resumed run's."""
    resume: bool = False
    """Continue the run in ``out`` from its newest checkpoint (``--resume``)."""
    corpus: DataConfig = field(default_factory=DataConfig)
    """How the corpus is split and cut into blocks (the ``data`` section)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, logging and checkpointing (the ``train`` section)."""


@dataclass
class PretrainConfig(RunConfig):
    """``codebook-lens pretrain``: a run plus the model trained from scratch."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (the ``model`` section)."""


@dataclass
class FineTuneConfig(RunConfig):
    """``codebook-lens train``: a run plus the base model and the codebooks attached to it."""

    base: str | None = None
    """The base model: a folder or a hub id (None: the resumed run's)."""
    tokenizer: str | None = None
    """Tokenizer spec (None: the base model's own)."""
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    """The codebooks (the ``codebook`` section; its seed is the training seed)."""


@dataclass
class EvalConfig:
    """``codebook-lens eval``: a model, the text it is scored on and how."""

    model: str
    """A model folder (or run folder) or a hub id."""
    data: str | None = None
    """The corpus (None: the one recorded with the model)."""
    corpus: DataConfig = field(default_factory=DataConfig)
    """Split and block settings (default: the ones saved with the model)."""
    tokenizer: str | None = None
    """Tokenizer spec (None: the model's own)."""
    split: Literal["val", "train", "all"] = "val"
    """Documents scored."""
    batch_size: int = 16
    """Sequences per batch."""
    max_batches: int | None = None
    """Stop after this many batches."""
    device: str | None = None
    """cpu / cuda (None: cuda if available)."""
    json: bool = False
    """Print a JSON object instead of a table."""


def run_sections(
    out: str, resume: bool, config_file: str | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The resumed run's ``run_config.json`` (``{}`` for a new run) and the config sections a
    run starts from: the resumed run's, else the ``--config`` file's."""
    path = Path(out).expanduser()
    _check_out_dir(path, resume)
    saved: dict[str, Any] = read_json(path / RUN_CONFIG) if resume else {}
    sections = saved.get("configs") if resume else load_run_config_file(config_file)
    if not isinstance(sections, dict):
        raise ValueError(f"{path / RUN_CONFIG}: field 'configs' is missing")
    return saved, sections


def saved_data_config(model: str) -> tuple[DataConfig, str | None]:
    """The data settings and corpus saved with a model folder (defaults and None without)."""
    p = Path(resolve_model_path(model))
    saved = read_json(p / RUN_CONFIG) if (p / RUN_CONFIG).is_file() else {}
    if not isinstance(saved, dict):
        return DataConfig(), None
    data = saved.get("configs", {}).get("data", {})
    return config_from_dict(DataConfig, data, source=str(p / RUN_CONFIG)), saved.get("data")


# -------------------------------------------------------------------- the commands
def run_pretrain(cfg: PretrainConfig) -> int:
    """``codebook-lens pretrain``: train a small causal LM from scratch on a corpus."""
    run = _start(cfg, {"model": cfg.model, "data": cfg.corpus, "train": cfg.train})
    mcfg = cfg.model
    dcfg: DataConfig = run.configs["data"]
    if dcfg.block_size > mcfg.context:
        raise ValueError(
            f"block_size={dcfg.block_size} is invalid: the model's context is "
            f"{mcfg.context} tokens; use --block-size <= {mcfg.context} or raise --context"
        )
    data = _data(
        run,
        run.source,
        lambda docs: _tokenizer_for_run(mcfg.tokenizer, docs, run.resume_dir, cfg.out),
    )
    model = build_base(mcfg, data.tokenizer, seed=cfg.train.seed)
    return _train_evaluate_save(run, "pretrain", model, data, {})


def run_train(cfg: FineTuneConfig) -> int:
    """``codebook-lens train``: attach codebooks to a base model and fine-tune on a corpus."""
    from transformers import AutoTokenizer

    run = _start(cfg, {"codebook": cfg.codebook, "data": cfg.corpus, "train": cfg.train})
    base_name = cfg.base or run.saved.get("base")
    if not base_name:
        raise ValueError("--base is required (a model folder or a hub id)")
    split = load_split(run.source, run.configs["data"])
    seed_everything(run.configs["train"].seed)
    model, path = _codebook_model(base_name, run.configs)

    def tokenizer(train_docs: list[Document]) -> Any:
        if cfg.tokenizer:
            return load_tokenizer(cfg.tokenizer, train_docs)
        if run.resume_dir is not None and (run.resume_dir / "tokenizer").is_dir():
            return AutoTokenizer.from_pretrained(str(run.resume_dir / "tokenizer"))
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception:
            raise FileNotFoundError(
                f"--base {base_name}: has no tokenizer files; pass --tokenizer "
                "(a folder, hub id, 'gpt2' or 'bpe:N')"
            ) from None

    data = _data(run, split, tokenizer)
    base = model.base if isinstance(model, CodebookModel) else model
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and len(data.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(data.tokenizer)} tokens but the model's vocab_size is "
            f"{vocab}; use the tokenizer the model was trained with"
        )
    return _train_evaluate_save(run, "train", model, data, {"base": base_name})


# ------------------------------------------------------- stages of a run
@dataclass
class _Run:
    """The checked inputs of one ``pretrain`` / ``train`` run; nothing is written yet."""

    out: Path
    """The run folder (``--out``)."""
    resume: bool
    """Continue the run in ``out`` (``--resume``)."""
    saved: dict[str, Any]
    """``run_config.json`` of the run being resumed (empty for a new run)."""
    source: str
    """The data source (``--data``, or the resumed run's)."""
    configs: dict[str, Any]
    """The command's configs by section: ``"data"``, ``"train"`` and ``"model"``/``"codebook"``."""
    device: torch.device
    """This process's device."""
    rank: int
    """This process's rank under torchrun (0 otherwise)."""
    world: int
    """Processes under torchrun (1 otherwise)."""

    @property
    def resume_dir(self) -> Path | None:
        return self.out if self.resume else None


def _start(cfg: RunConfig, configs: dict[str, Any]) -> _Run:
    """Check ``out`` and the corpus, join torchrun; ``configs`` are the run's sections."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars only; no "Loading weights" per load
    out = Path(cfg.out).expanduser()
    saved, _ = run_sections(cfg.out, cfg.resume, None)
    source = cfg.data or saved.get("data")
    if not source:
        raise ValueError("--data is required (a path, 'bbc', 'shakespeare' or hf:NAME)")
    device = init_distributed(cfg.train.device)
    rank, world = rank_world()
    return _Run(out, cfg.resume, saved, source, configs, device, rank, world)


def _data(
    run: _Run, source: str | Split, tokenizer: Callable[[list[Document]], Any]
) -> TrainingData:
    """The data stage: this rank's batch stream and the validation batches."""
    tcfg: TrainConfig = run.configs["train"]
    return training_data(
        source,
        run.configs["data"],
        tokenizer,
        batch_size=tcfg.batch_size,
        eval_batches=tcfg.eval_batches,
        seed=tcfg.seed,
        rank=run.rank,
        world_size=run.world,
    )


def _train_evaluate_save(
    run: _Run, command: str, model: nn.Module, data: TrainingData, extras: dict[str, Any]
) -> int:
    """The common end of ``pretrain`` and ``train``: train -> evaluate -> save."""
    tcfg: TrainConfig = run.configs["train"]
    model.to(run.device)
    run_config = {
        "command": command,
        "data": run.source,
        "configs": {k: dataclasses.asdict(v) for k, v in run.configs.items()},
        **extras,
    }
    # Every input is valid: from here on files are written.
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.out / RUN_CONFIG, run_config)
        for junk in run.out.glob(".tokenizer.tmp-*"):  # left by a run killed while saving it
            shutil.rmtree(junk, ignore_errors=True)
        if not (run.out / "tokenizer").exists():
            tmp = run.out / f".tokenizer.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            data.tokenizer.save_pretrained(tmp)
            tmp.rename(run.out / "tokenizer")
        print(
            f"{command}: {len(data.train_docs)} train / {len(data.val_docs)} validation "
            f"documents, {data.stream.blocks.shape[0]} blocks of {run.configs['data'].block_size} "
            f"tokens; {sum(p.numel() for p in model.parameters()):,} parameters",
            file=sys.stderr,
        )
    result = fit(
        model, data.stream, tcfg, run.out, eval_batches=data.eval_batches, resume=run.resume
    ).result
    assert result is not None  # no callback stops it
    if run.rank == 0:
        final_eval = (
            evaluate(model, fixed_batches(data.val_blocks, tcfg.batch_size))
            if data.val_blocks is not None
            else None
        )
        path = _save_final(run.out, model, data.tokenizer, run_config, final_eval)
        if final_eval is not None:
            print(format_table(final_eval))
        print(f"saved {path} ({result.step} steps, {result.tokens:,} tokens)", file=sys.stderr)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------ build
def _tokenizer_for_run(spec: str, train_docs: Any, resume_dir: Path | None, output_dir: str) -> Any:
    """The run's tokenizer: the saved one on resume (a retrained BPE could differ), else
    ``load_tokenizer(spec)``. Under torchrun rank 0 builds it and the others load its copy."""
    from transformers import AutoTokenizer

    if resume_dir is not None and (resume_dir / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(str(resume_dir / "tokenizer"))
    rank, world = rank_world()
    if world == 1 or not spec.startswith("bpe:"):
        return load_tokenizer(spec, train_docs)
    import torch.distributed as dist

    # Byte-level BPE training is not guaranteed identical across processes: share rank 0's,
    # beside the run folder (which every node must see anyway, to resume).
    out = Path(output_dir)
    shared = out.parent / f".{out.name}.tokenizer-{os.environ.get('MASTER_PORT', '0')}"
    if rank == 0:
        tok = load_tokenizer(spec, train_docs)
        tok.save_pretrained(shared)
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(str(shared)) if rank else tok
    dist.barrier()
    if rank == 0:
        shutil.rmtree(shared, ignore_errors=True)
    return tok


def _codebook_model(base_name: str, configs: dict[str, Any]) -> tuple[nn.Module, str]:
    """``train``'s build stage: the base model with codebooks attached (unless it has them), and
    the folder (or hub id) it was loaded from."""
    base, path = load_base_model(base_name)
    model = with_codebooks(base, configs["codebook"], seed=configs["train"].seed)
    inner = model.base if isinstance(model, CodebookModel) else model
    check_block_size(configs["data"].block_size, getattr(inner, "config", None))
    return model, path


# ------------------------------------------------------- run folders
def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def load_run_config_file(path: str | None) -> dict[str, dict[str, Any]]:
    """Sections of a ``--config`` YAML/JSON file: ``{"codebook": {...}, "train": {...}, ...}``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    text = p.read_bytes()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text.decode("utf-8"))
        else:
            data = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
    allowed = ("codebook", "train", "data", "model")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {list(allowed)}")
    for key, value in data.items():
        if key not in allowed:
            raise ValueError(
                f"{path}: unknown section {key!r}; allowed sections are {list(allowed)}"
            )
        if not isinstance(value, dict):
            raise ValueError(f"{path}: section {key!r} must be a mapping of field: value")
    return data


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / RUN_CONFIG).is_file():
            raise FileNotFoundError(f"--out {out}: no {RUN_CONFIG} here, so nothing to resume")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out {out}: exists and is not empty; pass --resume to continue that run or "
            "choose a new directory"
        )


def _save_final(
    out: Path, model: nn.Module, tokenizer: Any, run_config: dict[str, Any], metrics: Any
) -> Path:
    """Save the final model + tokenizer + run config + eval to ``out/model`` in one swap."""
    with replace_dir_atomic(out / MODEL_DIR) as tmp:
        if isinstance(model, CodebookModel):
            model.save_pretrained(tmp, tokenizer=tokenizer)
        else:
            model.save_pretrained(tmp)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RUN_CONFIG, run_config)
        if metrics is not None:
            write_json_atomic(tmp / "eval.json", metrics)
    return out / MODEL_DIR


# ------------------------------------------------------------------- eval
def run_eval(cfg: EvalConfig) -> int:
    """``codebook-lens eval MODEL``: base vs codebook metrics on held-out text.

    The data settings default to the ones saved with the model (``run_config.json``, see
    ``saved_data_config``), so the validation split is the one held out in training.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.model)
    dcfg = cfg.corpus
    source = cfg.data or saved_data_config(cfg.model)[1]
    if not source:
        raise ValueError("--data is required (the model folder does not record its corpus)")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is invalid; it must be >= 1")
    if cfg.max_batches is not None and cfg.max_batches < 1:
        raise ValueError(f"--max-batches {cfg.max_batches} is invalid; it must be >= 1")

    model = _eval_model(cfg.model, path)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    base = model.base if isinstance(model, CodebookModel) else model
    check_block_size(dcfg.block_size, getattr(base, "config", None))
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:
            raise FileNotFoundError(
                f"MODEL {cfg.model}: has no tokenizer files; pass --tokenizer"
            ) from None

    docs = load_documents(source, limit=dcfg.limit)
    if cfg.split == "all":
        chosen = docs
    else:
        train_docs, val_docs = split_documents(docs, dcfg.val_fraction, dcfg.split_seed)
        chosen = val_docs if cfg.split == "val" else train_docs
        if not chosen:
            raise ValueError(f"--split {cfg.split} is empty (val_fraction={dcfg.val_fraction})")
    blocks = pack_tokens(chosen, tokenizer, dcfg.block_size)
    metrics = evaluate(
        model,
        fixed_batches(blocks, cfg.batch_size, cfg.max_batches),
        progress=not cfg.json,
    )
    if cfg.json:
        json.dump(metrics, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(metrics))
    return 0


def _eval_model(name: str, path: str) -> nn.Module:
    """``eval``'s model: a local folder (codebook or plain) or a hub id; errors name ``MODEL``."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    model: Any
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            model = CodebookModel.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    elif p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"MODEL {name}: no such model folder")
    else:  # a hub id: a codebook model if it has a codebook config, else a plain causal LM
        try:
            model = CodebookModel.from_pretrained(path)
        except FileNotFoundError:
            try:
                model = AutoModelForCausalLM.from_pretrained(path)
            except Exception as e:
                raise FileNotFoundError(
                    f"MODEL {name}: cannot load it from the hub ({type(e).__name__}); "
                    "pass a local model folder, or check the id and your connection"
                ) from None
    return model
