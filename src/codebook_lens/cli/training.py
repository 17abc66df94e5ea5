"""Subcommands of the training stage: ``pretrain``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
from typing import Any

from codebook_lens.cli.base import add_threads, command
from codebook_lens.flags import add_dataclass_args, configs_from_args, dataclass_from_args


# ------------------------------------------------------- training / evaluation
def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="corpus: a .txt/.md/.jsonl file, a folder, 'bbc', 'shakespeare' or hf:NAME",
    )
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, model/)")
    p.add_argument("--config", default=None, help="YAML/JSON file with config sections")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )


@command("pretrain", "train a small causal LM from scratch on a corpus (a base model)")
def _pretrain_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.training.base_models import ModelConfig
    from codebook_lens.training.data import DataConfig
    from codebook_lens.training.loop import TrainConfig
    from codebook_lens.training.pipeline import run_pretrain

    _add_run_args(p)
    add_threads(p)
    add_dataclass_args(p, ModelConfig)
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, TrainConfig)

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.training.pipeline import PretrainConfig

        saved, c = _run_sections(
            args, {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        )
        return run_pretrain(
            PretrainConfig(out=args.out, data=args.data or saved.get("data"), resume=args.resume,
                           corpus=c["data"], train=c["train"], model=c["model"])
        )  # fmt: skip

    p.set_defaults(func=run)


def _run_sections(
    args: argparse.Namespace, classes: dict[str, type]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's saved ``run_config.json`` and its configs: saved / ``--config`` values, then flags."""
    from codebook_lens.training.pipeline import run_sections

    saved, sections = run_sections(args.out, args.resume, args.config)
    return saved, configs_from_args(args, sections, classes)


@command("train", "attach codebooks to a base model and train them on a corpus")
def _train_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.model.config import CodebookConfig
    from codebook_lens.training.data import DataConfig
    from codebook_lens.training.loop import TrainConfig
    from codebook_lens.training.pipeline import run_train

    p.add_argument("--base", default=None, help="base model: a folder or a hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the base model's own)")
    _add_run_args(p)
    add_threads(p)
    add_dataclass_args(p, CodebookConfig, skip=("seed",))
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, TrainConfig)

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.training.pipeline import FineTuneConfig

        classes = {"codebook": CodebookConfig, "data": DataConfig, "train": TrainConfig}
        saved, c = _run_sections(args, classes)
        return run_train(
            FineTuneConfig(out=args.out, data=args.data or saved.get("data"), resume=args.resume,
                           corpus=c["data"], train=c["train"], base=args.base or saved.get("base"),
                           tokenizer=args.tokenizer, codebook=c["codebook"])
        )  # fmt: skip

    p.set_defaults(func=run)


@command("eval", "loss, accuracy, reconstruction and code usage: base vs codebook model")
def _eval_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.training.data import DataConfig
    from codebook_lens.training.pipeline import run_eval

    p.add_argument("model", help="a model folder (or run folder) or a hub id")
    p.add_argument("--data", default=None, help="corpus (default: the one it was trained on)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    p.add_argument(
        "--split", choices=["val", "train", "all"], default="val", help="documents to use"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    add_threads(p)
    add_dataclass_args(p, DataConfig)

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.training.pipeline import EvalConfig, saved_data_config

        saved, _ = saved_data_config(args.model)
        options = ("data", "tokenizer", "split", "batch_size", "max_batches", "device", "json")
        return run_eval(
            EvalConfig(
                model=args.model,
                corpus=dataclass_from_args(DataConfig, args, base=saved),
                **{k: getattr(args, k) for k in options},
            )
        )

    p.set_defaults(func=run)
