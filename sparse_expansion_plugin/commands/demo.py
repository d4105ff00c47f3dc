"""``sparse-expansion demo``: analyse, compress (SparseGPT, Sparse Expansion), evaluate, one table.

Sizes left unset on the command line take ``DemoConfig``'s defaults (the one
place they live); the config is imported only when the command runs, since
it pulls in torch and llm-compressor and ``--help`` must stay instant.
"""

from __future__ import annotations

import argparse

from sparse_expansion_plugin.commands.arguments import (
    nonnegative_int,
    positive_int,
    sequence_length,
    sparsity,
)
from sparse_expansion_plugin.data.locations import DEFAULT_MODEL

# flag destination -> DemoConfig field
FIELDS = {
    "sparsity": "sparsity",
    "experts": "num_experts",
    "calibration_samples": "calibration_samples",
    "seq_len": "seq_len",
    "eval_windows": "eval_windows",
    "seed": "seed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help="HF name, dir, or 'smollm2-135m' (default, offline)"
    )
    parser.add_argument("--output", "-o", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output directory the demo wrote")
    parser.add_argument("--sparsity", type=sparsity, help="fraction of FFN weights pruned, in [0, 1)")
    parser.add_argument("--experts", type=positive_int, help="Sparse Expansion experts per FFN")
    parser.add_argument("--calibration-samples", type=positive_int, help="calibration windows")
    parser.add_argument("--seq-len", type=sequence_length, help="tokens per window")
    parser.add_argument("--eval-windows", type=positive_int, help="held-out windows per text kind")
    parser.add_argument("--seed", type=nonnegative_int)


def run(args: argparse.Namespace) -> int:
    from sparse_expansion_plugin.demo import DemoConfig, run_demo

    given = {field: getattr(args, flag) for flag, field in FIELDS.items() if getattr(args, flag) is not None}
    run_demo(args.output, DemoConfig(model=args.model, **given), overwrite=args.overwrite)
    return 0
