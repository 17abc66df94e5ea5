"""Subcommands that run the paper's experiments: ``experiment topics|concepts|compare``, ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from codebook_lens.cli.base import add_threads, command
from codebook_lens.flags import add_dataclass_args, dataclass_from_args


@command(
    "experiment",
    "run a paper experiment end to end and write its report (topics, concepts, compare)",
)
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
    add_threads(t)
    add_dataclass_args(t, TopicsConfig, skip=("prompts",))

    def run(args: argparse.Namespace) -> int:
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
    add_threads(c)
    add_dataclass_args(c, ConceptsConfig)

    def run_concepts_cmd(args: argparse.Namespace) -> int:
        from codebook_lens.experiments.concepts import format_summary, run_concepts

        cfg = dataclass_from_args(ConceptsConfig, args)
        print(format_summary(run_concepts(cfg)))
        print(f"report: {Path(cfg.out) / 'report.html'}")
        return 0

    c.set_defaults(func=run_concepts_cmd)
    _compare_setup(sub)


def _compare_setup(sub: argparse._SubParsersAction) -> None:
    from codebook_lens.experiments.compare import CompareConfig

    p = sub.add_parser(
        "compare",
        help="codebooks against sparse autoencoders (sparsify, SAELens) at matched size and L0",
        description="codebooks against SAEs trained by their own libraries (needs the extra "
        "saes); --quick: about a minute",
    )
    add_threads(p)
    add_dataclass_args(p, CompareConfig)

    def run(args: argparse.Namespace) -> int:
        from codebook_lens.experiments.compare import format_summary, run_compare

        cfg = dataclass_from_args(CompareConfig, args)
        print(format_summary(run_compare(cfg, progress=print)))
        print(f"report: {Path(cfg.out) / 'report.html'}")
        return 0

    p.set_defaults(func=run)


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
            data = run_seeds(cfg, seeds, args.out)
            print(seeds_summary(data))
            return 1 if data["gate_failed"] else 0
        metrics = run_demo(cfg, args.out)
        print(summary(metrics))
        return 0 if metrics["base_gate"]["passed"] else 1

    p.set_defaults(func=run)
