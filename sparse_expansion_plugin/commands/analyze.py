"""``sparse-expansion analyze MODEL``: per-neuron WD, MD and kurtosis report with plots."""

from __future__ import annotations

import argparse

from sparse_expansion_plugin.commands.arguments import (
    nonnegative_float,
    nonnegative_int,
    positive_int,
    sequence_length,
)
from sparse_expansion_plugin.data.locations import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help="HF name, local dir, or 'smollm2-135m' (default, offline)",
    )
    parser.add_argument(
        "--output", "-o", default="runs/analyze", help="report directory (default: runs/analyze)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="linear names, suffixes (mlp.up_proj) or 're:' regexes; default: every FFN input projection",
    )
    parser.add_argument(
        "--windows", type=positive_int, default=16, help="number of text windows (default 16)"
    )
    parser.add_argument(
        "--seq-len", type=sequence_length, default=512, help="tokens per window (default 512)"
    )
    parser.add_argument("--split", default="calibration", choices=["calibration", "evaluation"])
    parser.add_argument(
        "--sources", default="python_docs,jargon_file", help="bundled sources or hub names (wikitext2, c4)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument(
        "--pairs", type=positive_int, default=1000, help="token pairs for mapping difficulty (default 1000)"
    )
    parser.add_argument(
        "--threshold",
        type=nonnegative_float,
        default=0.1,
        help="WD above which a neuron is counted (default 0.1)",
    )
    parser.add_argument(
        "--plot-layer", default=None, help="layer (name, suffix or index) whose top neurons are plotted"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from sparse_expansion_plugin.analysis.analyze import AnalysisConfig, analyze_model
    from sparse_expansion_plugin.data.locations import checked_model_location
    from sparse_expansion_plugin.data.models import load_model_and_tokenizer
    from sparse_expansion_plugin.outputs import check_output_dir

    check_output_dir(args.output, args.overwrite, [args.model])  # fail before the model loads
    location = checked_model_location(args.model, args.seq_len)
    model, tokenizer = load_model_and_tokenizer(location, device=args.device)
    config = AnalysisConfig(
        layers=args.layers,
        num_windows=args.windows,
        seq_len=args.seq_len,
        split=args.split,
        sources=tuple(s.strip() for s in args.sources.split(",")),
        batch_size=args.batch_size,
        num_pairs=args.pairs,
        seed=args.seed,
        threshold=args.threshold,
        plot_layer=args.plot_layer,
    )
    analyze_model(model, tokenizer, args.output, config, overwrite=args.overwrite)
    print(f"report written to {args.output}: summary.csv, neurons.csv, wd_by_layer.png, top_neurons.png")
    return 0
