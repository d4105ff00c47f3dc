"""``sparse-expansion demo``: analyse, compress (SparseGPT, Sparse Expansion), evaluate, one table."""

from __future__ import annotations

import argparse

from sparse_expansion_plugin.commands.arguments import (
    nonnegative_int,
    positive_int,
    sequence_length,
    sparsity,
)
from sparse_expansion_plugin.demo import DemoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument(
        "model", nargs="?", default=defaults.model, help="HF name, dir, or 'smollm2-135m' (default, offline)"
    )
    parser.add_argument("--output", "-o", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--sparsity", type=sparsity, default=defaults.sparsity)
    parser.add_argument(
        "--experts",
        type=positive_int,
        default=defaults.num_experts,
        help="Sparse Expansion experts (default 16)",
    )
    parser.add_argument("--calibration-samples", type=positive_int, default=defaults.calibration_samples)
    parser.add_argument("--seq-len", type=sequence_length, default=defaults.seq_len)
    parser.add_argument(
        "--eval-windows",
        type=positive_int,
        default=defaults.eval_windows,
        help="held-out windows per text kind",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=defaults.seed)


def run(args: argparse.Namespace) -> int:
    from sparse_expansion_plugin.demo import run_demo

    config = DemoConfig(
        model=args.model,
        sparsity=args.sparsity,
        num_experts=args.experts,
        calibration_samples=args.calibration_samples,
        seq_len=args.seq_len,
        eval_windows=args.eval_windows,
        seed=args.seed,
    )
    run_demo(args.output, config, overwrite=args.overwrite)
    return 0
