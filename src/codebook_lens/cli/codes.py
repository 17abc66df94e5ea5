"""Subcommands of the codes stage: ``cache``, ``search``, ``code``, ``verify``, ``stats``, ``generate``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from codebook_lens.cli.base import add_saes, add_threads, check_positive, command, load_model


@command("cache", "run a codebook model over text and store every token's codes (a code cache)")
def _cache_setup(p: argparse.ArgumentParser) -> None:
    add_threads(p)
    p.add_argument(
        "model",
        help="folder written by CodebookModel.save_pretrained (with --sae: or a plain HF model)",
    )
    add_saes(p, "to cache as a codebook (each token's top-k latents and their activations)")
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

    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from codebook_lens.codes.cache import (
        DEFAULT_CHUNK_TOKENS,
        build_cache,
        interleave_labels,
        resolve_shard,
    )
    from codebook_lens.model.tokenizer import load_tokenizer
    from codebook_lens.training.data import load_documents

    check_positive("--tokens", args.tokens)
    check_positive("--batch-size", args.batch_size)
    check_positive("--seq-len", args.seq_len)
    check_positive("--chunk-tokens", args.chunk_tokens)
    check_positive("--sae-k", args.sae_k)
    shard, device = resolve_shard(args.shards, args.shard, args.device)
    model, tokenizer = load_model(args.model, device, args.sae, args.sae_k)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer saved with the model; pass --tokenizer")
    cache = build_cache(
        model, tokenizer, interleave_labels(load_documents(args.data)), args.out,
        max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
        overwrite=args.overwrite, source=args.data, codebooks=args.codebooks, index=args.index,
        resume=args.resume, shard=shard, chunk_tokens=args.chunk_tokens or DEFAULT_CHUNK_TOKENS,
    )  # fmt: skip
    print(
        f"wrote {cache.path}: {cache.n_tokens} tokens, {cache.n_docs} documents, "
        f"{len(cache.codebooks)} codebooks"
    )
    return 0


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

    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from codebook_lens.codes import search as S
    from codebook_lens.codes.cache import CodeCache

    cache = CodeCache(args.cache)
    check_positive("--top", args.top)
    check_positive("--workers", args.workers)
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout={args.timeout} is invalid; it must be > 0 seconds")
    pattern = S.make_pattern(
        cache, regex=args.regex, token=args.token, docs_label=args.docs_label,
        timeout=args.timeout, workers=args.workers,
    )  # fmt: skip
    result = S.search(
        cache, pattern, codebooks=args.codebook, min_count=args.min_count,
        min_precision=args.min_precision, min_recall=args.min_recall, top=args.top,
        sort_by=args.sort_by, workers=args.workers,
    )  # fmt: skip
    baseline = _neuron_baseline(args, cache, pattern, result) if args.neuron_baseline else None
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


def _neuron_baseline(args: argparse.Namespace, cache: Any, pattern: Any, result: Any) -> Any:
    """``search --neuron-baseline``: the best single neuron at the best code's codebook."""
    from codebook_lens.codes.analysis import neuron_baseline

    if not args.model:
        raise ValueError("--neuron-baseline needs --model (the model the cache was built with)")
    target = (args.codebook or [m.codebook for m in result.matches[:1]] or [None])[0]
    if target is None:
        raise ValueError("no code fires on the pattern; nothing to compare a neuron with")
    model, _ = load_model(args.model)
    return neuron_baseline(model, cache, pattern, target, max_tokens=args.neuron_tokens)


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
        if spec is not None and args.cache:
            from codebook_lens.codes.cache import CodeCache

            spec = spec.resolved(CodeCache(args.cache))
        check_positive("--sae-k", args.sae_k)
        model, tokenizer = load_model(args.model, args.device, args.sae, args.sae_k)
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
