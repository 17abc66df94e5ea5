"""The ``codebook-lens`` command: one subcommand per stage, each a thin call into a module.

Dataclass configs are turned into flags (``--num-codes 1000``, see ``flags.py``), so a config's
field docstrings are the ``--help`` text. Every user error exits with code 2 and one clear line
on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

# threads first: it sets OpenMP's wait policy before anything loads torch.
from codebook_lens import threads  # isort: skip
from codebook_lens.flags import add_dataclass_args, configs_from_args, dataclass_from_args

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Any]:
    """Register ``setup(parser)``; the parser's ``func`` default runs the command."""

    def wrap(setup: Callable[[argparse.ArgumentParser], None]) -> Any:
        def run(args: argparse.Namespace) -> int | None:
            return args.func(args)  # type: ignore[no-any-return]

        _COMMANDS[name] = (help, setup, run)
        return setup

    return wrap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebook-lens",
        description="Codebook features: train, evaluate, search and steer discrete codes in LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup, _) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        if getattr(args, "cpu_threads", None) is not None:
            threads.configure(args.cpu_threads)
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"codebook-lens {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)


# ---------------------------------------------------------------- commands
# Each stage registers one subcommand below: a setup function that adds flags and sets
# ``func``; the work itself lives in the stage's module.


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads`` of every long command (the demo has it in its config)."""
    p.add_argument(
        "--threads",
        dest="cpu_threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 (default): the cores no other process is using, re-checked "
        "as the load changes",
    )


@command("convert", "convert a checkpoint of the paper's reference code into a codebook-lens model")
def _convert_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="reference checkpoint: folder or hub id (model_type 'codebook')")
    p.add_argument("out", help="model folder to write (safetensors + JSON)")
    p.add_argument(
        "--base",
        default=None,
        help="folder or hub id whose config.json describes the base model (weights: from SRC)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to carry: 'digits' (TokFSM), 'gpt2' (TinyStories), a folder or hub id",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder")

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.model.reference import convert_reference

        model = convert_reference(
            args.src, args.out, args.base, tokenizer=args.tokenizer, overwrite=args.overwrite
        )
        names = list(model.codebooks)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        print(
            f"wrote {args.out}: {len(names)} codebooks ({shown}); their reference keys are "
            "under 'origin' in codebook_config.json"
        )
        return 0

    p.set_defaults(func=run)


@command("generate", "sample from a codebook model, with and without an intervention spec")
def _generate_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="folder written by CodebookModel.save_pretrained (or a hub id)")
    p.add_argument("prompt", help="prompt text (token ids separated by spaces if no tokenizer)")
    p.add_argument("--intervene", metavar="SPEC", help="intervention spec file (.yaml or .json)")
    p.add_argument("--n", type=int, default=5, help="samples per column (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="(default: 40)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")

    def run(args: argparse.Namespace) -> int:
        import shutil

        from codebook_lens.codes import intervene as iv

        spec = iv.InterventionSpec.load(args.intervene) if args.intervene else None
        model, tokenizer = iv.load_model_and_tokenizer(args.model, device=args.device)
        prompt = iv.parse_prompt(tokenizer, args.prompt)
        plain, steered = iv.compare(
            model,
            tokenizer,
            prompt,
            spec,
            num_samples=args.n,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        if args.json:
            out = {
                "prompt": args.prompt,
                "unsteered": [g._asdict() for g in plain],
                "steered": [g._asdict() for g in steered],
            }
            print(json.dumps(out))
        else:
            width = shutil.get_terminal_size((120, 24)).columns
            print(iv.format_side_by_side(args.prompt, plain, steered, width))
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------ code analysis
def _load_model(path: str, device: str | None = None) -> tuple[Any, Any]:
    from codebook_lens.codes.intervene import load_model_and_tokenizer

    return load_model_and_tokenizer(path, device=device)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}={value} is invalid; it must be an integer >= 1")


@command("cache", "run a codebook model over text and store every token's codes (a code cache)")
def _cache_setup(p: argparse.ArgumentParser) -> None:
    _add_threads(p)
    p.add_argument("model", help="folder written by CodebookModel.save_pretrained")
    p.add_argument("--data", required=True, help="text source: a file, a folder, 'bbc', ...")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to cache (default: 100000)")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model folder's)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: model max)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument(
        "--codebooks",
        nargs="+",
        metavar="GLOB",
        help="store only the codebooks matching these globs, e.g. 'layers.1[0-5].*' (default: all)",
    )
    p.add_argument(
        "--index",
        nargs="+",
        default=["all"],
        metavar="all|none|GLOB",
        help="codebooks that get an inverted index (default: all); without one, finding where "
        "a code fires scans the codes (search itself needs no index)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of --out")
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="split the documents over N shards (default: torchrun's WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--shard", type=int, default=None, help="the shard to write, 0 .. N-1 (default: RANK)"
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="tokens between checkpoints (default: 262144)",
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes.cache import (
            DEFAULT_CHUNK_TOKENS,
            build_cache,
            interleave_labels,
            resolve_shard,
        )
        from codebook_lens.model.tokenizer import load_tokenizer
        from codebook_lens.training.data import load_documents

        _check_positive("--tokens", args.tokens)
        _check_positive("--batch-size", args.batch_size)
        _check_positive("--seq-len", args.seq_len)
        _check_positive("--chunk-tokens", args.chunk_tokens)
        shard, device = resolve_shard(args.shards, args.shard, args.device)
        model, tokenizer = _load_model(args.model, device)
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer saved with the model; pass --tokenizer")
        cache = build_cache(
            model,
            tokenizer,
            interleave_labels(load_documents(args.data)),
            args.out,
            max_tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            source=args.data,
            codebooks=args.codebooks,
            index=args.index,
            resume=args.resume,
            shard=shard,
            chunk_tokens=args.chunk_tokens or DEFAULT_CHUNK_TOKENS,
        )
        print(
            f"wrote {cache.path}: {cache.n_tokens} tokens, {cache.n_docs} documents, "
            f"{len(cache.codebooks)} codebooks"
        )
        return 0

    p.set_defaults(func=run)


@command("search", "rank codes by precision/recall/F1 against a regex, token or document set")
def _search_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.codes.search import DEFAULT_REGEX_TIMEOUT, SORT_KEYS

    p.add_argument("cache", help="cache folder written by `codebook-lens cache`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--regex", help="regex over the text; a token matches if its span overlaps")
    g.add_argument("--token", help="token string (surrounding spaces ignored)")
    g.add_argument("--docs-label", help="all tokens of documents with this label")
    p.add_argument("--codebook", action="append", help="only this codebook (repeatable)")
    p.add_argument("--min-count", type=int, default=1, help="minimum firings of a code")
    p.add_argument("--min-precision", type=float, default=0.0, help="(default: 0)")
    p.add_argument("--min-recall", type=float, default=0.0, help="(default: 0)")
    p.add_argument("--top", type=int, default=20, help="results to show (default: 20)")
    p.add_argument("--sort-by", choices=list(SORT_KEYS), default="f1", help="(default: f1)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds a regex may run (default: {DEFAULT_REGEX_TIMEOUT:g} per million tokens "
        "of the cache, at least that)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--model", help="model folder; with --neuron-baseline")
    p.add_argument(
        "--neuron-baseline",
        action="store_true",
        help="also find the best single neuron at the best code's site (needs --model)",
    )
    p.add_argument(
        "--neuron-tokens",
        type=int,
        default=50_000,
        help="tokens used for the neuron baseline (default: 50000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes to search in (default: the cores, for a large query)",
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes import search as S
        from codebook_lens.codes.cache import CodeCache

        cache = CodeCache(args.cache)
        _check_positive("--top", args.top)
        _check_positive("--workers", args.workers)
        if args.timeout is not None and not args.timeout > 0:
            raise ValueError(f"--timeout={args.timeout} is invalid; it must be > 0 seconds")
        pattern = S.make_pattern(
            cache,
            regex=args.regex,
            token=args.token,
            docs_label=args.docs_label,
            timeout=args.timeout,
            workers=args.workers,
        )
        result = S.search(
            cache,
            pattern,
            codebooks=args.codebook,
            min_count=args.min_count,
            min_precision=args.min_precision,
            min_recall=args.min_recall,
            top=args.top,
            sort_by=args.sort_by,
            workers=args.workers,
        )
        baseline = None
        if args.neuron_baseline:
            if not args.model:
                raise ValueError(
                    "--neuron-baseline needs --model (the model the cache was built with)"
                )
            from codebook_lens.codes.analysis import neuron_baseline

            target = (args.codebook or [m.codebook for m in result.matches[:1]] or [None])[0]
            if target is None:
                raise ValueError("no code fires on the pattern; nothing to compare a neuron with")
            model, _ = _load_model(args.model)
            baseline = neuron_baseline(model, cache, pattern, target, max_tokens=args.neuron_tokens)
        if args.json:
            matches = [m.to_dict() for m in result.matches]
            out: Any = (
                matches
                if baseline is None
                else {"matches": matches, "neuron_baseline": baseline.to_dict()}
            )
            print(json.dumps(out))
            for note in cache.notes():  # what the cache leaves out, beside the JSON
                print(f"note: {note}", file=sys.stderr)
        else:
            print(S.format_matches(result))
            for note in cache.notes():
                print(f"note: {note}")
            if baseline is not None:
                nb, bc = baseline.neuron, baseline.best_code
                print(
                    f"\nneuron baseline at {baseline.codebook} on the first {baseline.n_tokens} "
                    f"tokens ({baseline.pattern_tokens} pattern tokens):"
                )
                op = ">=" if nb.sign > 0 else "<="
                print(
                    f"  best neuron {nb.neuron} (fires when activation {op} {nb.threshold:.4g}):"
                    f" precision {nb.precision:.3f} recall {nb.recall:.3f} f1 {nb.f1:.3f}"
                )
                if bc is not None:
                    hd = "" if bc.head is None else f" head {bc.head}"
                    print(
                        f"  best code {bc.code}{hd}: precision {bc.precision:.3f} "
                        f"recall {bc.recall:.3f} f1 {bc.f1:.3f}"
                    )
        return 0

    p.set_defaults(func=run)


@command("code", "profile one code: contexts, tokens, similar codes, promoted tokens")
def _code_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="cache folder written by `codebook-lens cache`")
    p.add_argument("codebook", help="codebook name, e.g. layers.0.mlp_out")
    p.add_argument("code", type=int, help="code id")
    p.add_argument("--head", type=int, default=None, help="head, for attn_heads codebooks")
    p.add_argument("--model", help="model folder: adds the tokens the code promotes")
    p.add_argument("--contexts", type=int, default=20, help="contexts to show (default: 20)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--html", metavar="FILE", help="also write an HTML page")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="highlight with ANSI colours (default: auto = when a terminal)",
    )

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from codebook_lens.codes import search as S
        from codebook_lens.codes.cache import CodeCache

        cache = CodeCache(args.cache)
        cache.check_code(args.codebook, args.code, args.head)
        model = _load_model(args.model)[0] if args.model else None
        prof = S.code_profile(
            cache, args.codebook, args.code, args.head, model=model, n_contexts=args.contexts
        )
        if args.html:
            S.save_html(S.profile_html(prof), Path(args.html))
        if args.json:
            print(json.dumps(prof.to_dict()))
        else:
            color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
            print(S.format_profile(prof, color=color))
        return 0

    p.set_defaults(func=run)


@command("verify", "check a code cache against its manifest: files, shapes, sizes, checksums")
def _verify_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="cache folder written by `codebook-lens cache`")
    p.add_argument("--quick", action="store_true", help="shapes and sizes only, no checksums")
    p.add_argument("--json", action="store_true", help="print {cache, ok, problems} as JSON")

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes.cache import verify_cache

        problems = verify_cache(args.cache, checksums=not args.quick)
        if args.json:
            rows = [{"file": q.file, "problem": q.what} for q in problems]
            print(json.dumps({"cache": args.cache, "ok": not problems, "problems": rows}))
        else:
            for q in problems:
                print(q)
        if problems:
            bad = sorted({q.file for q in problems})
            raise ValueError(f"{args.cache}: {len(bad)} bad file(s): {', '.join(bad)}")
        if not args.json:
            print(f"{args.cache}: ok" + (" (shapes and sizes; no checksums)" if args.quick else ""))
        return 0

    p.set_defaults(func=run)


@command("stats", "codebook health from a cache: usage, dead codes, entropy, plots")
def _stats_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="cache folder written by `codebook-lens cache`")
    p.add_argument("--codebook", action="append", help="only this codebook (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plots", metavar="DIR", help="save usage plots (PNG) into DIR")

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes.analysis import codebook_health, format_health, plot_health
        from codebook_lens.codes.cache import CodeCache

        cache = CodeCache(args.cache)
        stats = codebook_health(cache, args.codebook)
        paths = plot_health(cache, args.plots, args.codebook) if args.plots else []
        if args.json:
            print(json.dumps([s.to_dict() for s in stats]))
        else:
            print(f"{cache.path}: {cache.n_tokens} tokens, {cache.n_docs} documents")
            print(format_health(stats))
            for path in paths:
                print(f"wrote {path}")
        return 0

    p.set_defaults(func=run)


@command("serve", "browse a code cache in a local web app (search, code pages, text, steering)")
def _serve_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="cache folder written by `cache`")
    p.add_argument(
        "--model", dest="model_dir", metavar="DIR", help="the cache's model: enables steering"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free (default: 8000)")
    p.add_argument(
        "--regex-timeout", type=float, default=2.0, help="seconds per user regex (default: 2)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=200, help="steering limit per sample (default: 200)"
    )
    p.add_argument(
        "--search-workers",
        type=int,
        default=None,
        help="processes running searches (default: one per core; 0 = in the server process)",
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.app import AppConfig, serve

        config = AppConfig(
            cache_dir=args.cache_dir,
            model_dir=args.model_dir,
            host=args.host,
            port=args.port,
            regex_timeout=args.regex_timeout,
            max_new_tokens=args.max_new_tokens,
            search_workers=args.search_workers,
        )
        from codebook_lens.codes.cache import CodeCache

        for note in CodeCache(args.cache_dir).notes():  # codebooks or indices left out
            print(f"note: {note}")
        serve(config)
        return 0

    p.set_defaults(func=run)


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
    _add_threads(p)
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
    _add_threads(p)
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
    _add_threads(p)
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


@command("experiment", "run a paper experiment end to end and write its report (topics, concepts)")
def _experiment_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.experiments.concepts import ConceptsConfig
    from codebook_lens.experiments.topics import TopicsConfig

    sub = p.add_subparsers(dest="name", metavar="name", required=True)
    t = sub.add_parser("topics", help="topic steering on BBC News", description="topic steering")
    t.add_argument(
        "--prompt",
        dest="prompt_list",
        action="append",
        default=None,
        help="a neutral prompt (repeat the flag for several; default: 8 built-in prompts)",
    )
    _add_threads(t)
    add_dataclass_args(t, TopicsConfig, skip=("prompts",))

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from codebook_lens.experiments.topics import run_topics

        cfg = dataclass_from_args(TopicsConfig, args)
        if args.prompt_list:
            cfg.prompts = list(args.prompt_list)
            cfg.__post_init__()
        metrics = run_topics(cfg)
        print(f"{'topic':<15}{'unsteered':>10}{'steered':>10}{'samples':>9}")
        for topic, m in metrics["topics"].items():
            print(
                f"{topic:<15}{m['baseline_rate']:>10.0%}{m['steered_rate']:>10.0%}{m['samples']:>9}"
            )
        print(
            f"classifier held-out accuracy {metrics['classifier']['heldout_accuracy']:.1%}; "
            f"report: {Path(cfg.out) / 'report.html'}"
        )
        return 0

    t.set_defaults(func=run)
    c = sub.add_parser(
        "concepts",
        help="a battery of concepts: best code vs best neuron vs a k-means control",
        description="concept battery (--concepts FILE for your own)",
    )
    _add_threads(c)
    add_dataclass_args(c, ConceptsConfig)

    def run_concepts_cmd(args: argparse.Namespace) -> int:
        from pathlib import Path

        from codebook_lens.experiments.concepts import format_summary, run_concepts

        cfg = dataclass_from_args(ConceptsConfig, args)
        print(format_summary(run_concepts(cfg)))
        print(f"report: {Path(cfg.out) / 'report.html'}")
        return 0

    c.set_defaults(func=run_concepts_cmd)


@command("demo", "the finite-state-machine experiment end to end (what `make demo` runs)")
def _demo_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.experiments.fsm import DemoConfig

    p.add_argument("--out", default=None, help="output folder (default: runs/fsm-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="a tiny run (about a minute) for tests")
    p.add_argument(
        "--seeds",
        default=None,
        help="run at each of these seeds (seed = fsm seed), e.g. '0-4' or '0,2,5-7', into "
        "OUT/seed-S/, plus a summary report (default: one run at --seed/--fsm-seed)",
    )
    add_dataclass_args(p, DemoConfig)

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.experiments.fsm import (
            parse_seeds,
            run_demo,
            run_seeds,
            seeds_summary,
            summary,
        )

        base = DemoConfig.quick() if args.quick else DemoConfig()
        cfg = dataclass_from_args(DemoConfig, args, base=base)
        if args.seeds is not None:
            seeds = parse_seeds(args.seeds)
            if args.seed is not None or args.fsm_seed is not None:
                raise ValueError("--seeds sets both seeds of each run; drop --seed/--fsm-seed")
            print(seeds_summary(run_seeds(cfg, seeds, args.out)))
            return 0
        metrics = run_demo(cfg, args.out)
        print(summary(metrics))
        return 0

    p.set_defaults(func=run)


@command("architectures", "check which transformers architectures take codebooks (tiny models)")
def _architectures_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated model types to check (default: every causal LM of transformers)",
    )
    p.add_argument(
        "--write", metavar="PATH", default=None, help="write the table to PATH (e.g. docs/...)"
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.model.architecture_checks import (
            architectures_markdown,
            check_architectures,
            check_doc_path,
            write_architectures_doc,
        )

        only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
        if args.write:
            check_doc_path(args.write)  # before minutes of checks, not after
        checks = check_architectures(only)
        if args.write:
            out = write_architectures_doc(args.write, checks)
            print(f"wrote {out} ({len(checks)} architectures)")
        else:
            print(architectures_markdown(checks), end="")
        return 0

    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
