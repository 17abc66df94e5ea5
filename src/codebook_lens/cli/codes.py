"""Subcommands of the codes stage: ``cache``, ``search``, ``code``, ``verify``, ``stats``, ``generate``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codebook_lens.cli.base import add_saes, add_threads, check_positive, command, load_model
from codebook_lens.flags import add_dataclass_args, dataclass_from_args


def add_cache(p: argparse.ArgumentParser, json_help: str = "print JSON") -> None:
    """The positional ``cache`` and ``--json`` of the commands that read a code cache."""
    p.add_argument("cache", help="cache folder written by `codebook-lens cache`")
    p.add_argument("--json", action="store_true", help=json_help)


@command("cache", "run a codebook model over text and store every token's codes (a code cache)")
def _cache_setup(p: argparse.ArgumentParser) -> None:
    add_threads(p)
    p.add_argument(
        "model",
        help="folder written by CodebookModel.save_pretrained (with --sae: or a plain HF model)",
    )
    add_saes(p, "to cache as a codebook (each token's top-k latents and their activations)")
    from codebook_lens.codes.cache import CacheConfig

    add_dataclass_args(p, CacheConfig)
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from codebook_lens.codes.cache import (
        CacheConfig,
        build_cache,
        interleave_labels,
        resolve_shard,
    )
    from codebook_lens.model.tokenizer import load_tokenizer
    from codebook_lens.training.data import load_documents

    cfg: CacheConfig = dataclass_from_args(CacheConfig, args)
    for name in ("tokens", "batch_size", "seq_len", "chunk_tokens"):
        check_positive("--" + name.replace("_", "-"), getattr(cfg, name))
    check_positive("--sae-k", args.sae_k)
    shard, device = resolve_shard(cfg.shards, cfg.shard, cfg.device)
    model, tokenizer = load_model(args.model, device, args.sae, args.sae_k)
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer saved with the model; pass --tokenizer")
    documents = interleave_labels(load_documents(cfg.data))
    cache = build_cache(model, tokenizer, documents, cfg.out, shard=shard, **cfg.build_options())
    print(
        f"wrote {cache.path}: {cache.n_tokens} tokens, {cache.n_docs} documents, "
        f"{len(cache.codebooks)} codebooks"
    )
    return 0


@command("search", "rank codes by precision/recall/F1 against a regex, token or document set")
def _search_setup(p: argparse.ArgumentParser) -> None:
    from codebook_lens.codes.search import SearchConfig

    add_cache(p, "print a JSON list of results")
    add_dataclass_args(p, SearchConfig)

    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from codebook_lens.codes import search as S
    from codebook_lens.codes.cache import CodeCache

    cache = CodeCache(args.cache)
    cfg: S.SearchConfig = dataclass_from_args(S.SearchConfig, args)
    check_positive("--top", cfg.top)
    check_positive("--workers", cfg.workers)
    if cfg.timeout is not None and not cfg.timeout > 0:
        raise ValueError(f"--timeout={cfg.timeout} is invalid; it must be > 0 seconds")
    query = {"regex": cfg.regex, "token": cfg.token, "docs_label": cfg.docs_label}
    pattern = S.make_pattern(cache, **query, timeout=cfg.timeout, workers=cfg.workers)
    ranking = ("min_count", "min_precision", "min_recall", "top", "sort_by", "workers")
    result = S.search(
        cache, pattern, codebooks=cfg.codebook, **{k: getattr(cfg, k) for k in ranking}
    )
    baseline = _neuron_baseline(cfg, cache, pattern, result) if cfg.neuron_baseline else None
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
        return 0
    print(S.format_matches(result))
    for note in cache.notes():
        print(f"note: {note}")
    if baseline is not None:
        from codebook_lens.codes.analysis import format_neuron_baseline

        print("\n" + format_neuron_baseline(baseline))
    return 0


def _neuron_baseline(cfg: Any, cache: Any, pattern: Any, result: Any) -> Any:
    """``search --neuron-baseline``: the best single neuron at the best code's codebook."""
    from codebook_lens.codes.analysis import neuron_baseline

    if not cfg.model:
        raise ValueError("--neuron-baseline needs --model (the model the cache was built with)")
    target = (cfg.codebook or [m.codebook for m in result.matches[:1]] or [None])[0]
    if target is None:
        raise ValueError("no code fires on the pattern; nothing to compare a neuron with")
    model, _ = load_model(cfg.model)
    return neuron_baseline(model, cache, pattern, target, max_tokens=cfg.neuron_tokens)


@command("code", "profile one code: contexts, tokens, similar codes, promoted tokens")
def _code_setup(p: argparse.ArgumentParser) -> None:
    add_cache(p, "print the profile as JSON")
    p.add_argument("codebook", help="codebook name, e.g. layers.0.mlp_out")
    p.add_argument("code", type=int, help="code id")
    p.add_argument("--head", type=int, default=None, help="head, for attn_heads codebooks")
    p.add_argument("--model", help="model folder: adds the tokens the code promotes")
    p.add_argument("--contexts", type=int, default=20, help="contexts to show (default: 20)")
    p.add_argument("--html", metavar="FILE", help="also write an HTML page")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="highlight with ANSI colours (default: auto = when a terminal)",
    )

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes import search as S
        from codebook_lens.codes.cache import CodeCache

        cache = CodeCache(args.cache)
        cache.check_code(args.codebook, args.code, args.head)
        model = load_model(args.model)[0] if args.model else None
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
    add_cache(p, "print {cache, ok, problems} as JSON")
    p.add_argument("--quick", action="store_true", help="shapes and sizes only, no checksums")

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
    add_cache(p)
    p.add_argument("--codebook", action="append", help="only this codebook (repeatable)")
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


@command("generate", "sample from a codebook model, with and without an intervention spec")
def _generate_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="folder written by CodebookModel.save_pretrained (or a hub id; with --sae: or a "
        "plain HF model)",
    )
    p.add_argument("prompt", help="prompt text (token ids separated by spaces if no tokenizer)")
    p.add_argument("--intervene", metavar="SPEC", help="intervention spec file (.yaml or .json)")
    add_saes(p, "whose latents the spec may edit (codebook 'sae.<site>')")
    p.add_argument(
        "--cache",
        help="cache of the model: a forced SAE latent without 'value' is added at 'scale' x its "
        "largest activation there",
    )
    from codebook_lens.codes.intervene import Sampling

    add_dataclass_args(p, Sampling)
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.codes import intervene as iv

        spec = iv.InterventionSpec.load(args.intervene) if args.intervene else None
        if spec is not None and args.cache:
            from codebook_lens.codes.cache import CodeCache

            spec = spec.resolved(CodeCache(args.cache))
        check_positive("--sae-k", args.sae_k)
        model, tokenizer = load_model(args.model, args.device, args.sae, args.sae_k)
        prompt = iv.parse_prompt(tokenizer, args.prompt)
        sampling = dataclass_from_args(iv.Sampling, args)
        plain, steered = iv.compare(model, tokenizer, prompt, spec, **asdict(sampling))
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
