"""``sparse-expansion ablate MODEL``: negative-computation ablation of top / random / bottom WD neurons.

Scores every FFN gate (or input) projection's neurons by WD on calibration
text, then measures token perplexity on the evaluation text with the
selected neurons' pre-activations clamped to >= 0 (and/or sign-flipped), for
each p. Writes ``ablation.json``, ``ablation.csv``, ``ablation.png`` and
``histograms.png`` (pre/post-activation of the top WD neurons) to a new
output directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from sparse_expansion_plugin.commands.arguments import nonnegative_int, percent, positive_int, sequence_length

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default="smollm2-135m", help="HF name or directory (default: smollm2-135m)"
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="new directory for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument(
        "--percents", type=percent, nargs="+", default=[0.5, 1.0, 2.0, 5.0], help="p in (0, 100]"
    )
    parser.add_argument(
        "--selections", nargs="+", default=["top", "random", "bottom"], choices=["top", "random", "bottom"]
    )
    parser.add_argument("--modes", nargs="+", default=["clamp", "flip"], choices=["clamp", "flip"])
    parser.add_argument("--calibration-windows", type=positive_int, default=32, help="windows scored for WD")
    parser.add_argument("--eval-windows", type=positive_int, default=40, help="windows for perplexity")
    parser.add_argument("--seq-len", type=sequence_length, default=512)
    parser.add_argument(
        "--sources", default="python_docs,jargon_file", help="text sources (bundled or hub names)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random selection")
    parser.add_argument(
        "--random-repeats", type=positive_int, default=1, help="random selections per p (seeds seed..)"
    )
    parser.add_argument("--histogram-neurons", type=positive_int, default=6, help="top WD neurons to plot")
    parser.add_argument(
        "--histogram-layer", type=int, default=None, help="layer index (default: holder of max WD)"
    )
    parser.add_argument(
        "--histogram-windows", type=positive_int, default=8, help="calibration windows for the histograms"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from sparse_expansion_plugin.analysis.ablation import (
        ablation_targets,
        check_percent,
        evaluate_ablation,
        pre_post_activations,
        wd_scores,
    )
    from sparse_expansion_plugin.analysis.ablation_plots import (
        plot_ablation_curves,
        plot_activation_histograms,
    )
    from sparse_expansion_plugin.data.locations import check_seq_len, checked_model_location
    from sparse_expansion_plugin.data.models import load_model_and_tokenizer
    from sparse_expansion_plugin.data.text import token_windows
    from sparse_expansion_plugin.outputs import atomic_output_dir, check_output_dir

    for p in args.percents:
        check_percent(p)
    check_output_dir(args.output_dir, args.overwrite, [args.model])
    location = checked_model_location(args.model)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(location)
    targets = ablation_targets(model)
    if args.histogram_layer is not None and not -len(targets) <= args.histogram_layer < len(targets):
        raise ValueError(
            f"--histogram-layer {args.histogram_layer} is out of range: the model has {len(targets)} FFN layers"
        )
    check_seq_len(model.config.to_dict(), args.seq_len)
    calib = token_windows(tokenizer, "calibration", args.seq_len, args.calibration_windows, args.sources)
    evaluation = token_windows(tokenizer, "evaluation", args.seq_len, args.eval_windows, args.sources)
    logger.info("scoring %d FFN projections by WD on %d x %d calibration tokens", len(targets), *calib.shape)
    scores = wd_scores(model, calib, targets, args.batch_size)
    table = evaluate_ablation(
        model,
        evaluation,
        scores,
        args.percents,
        args.selections,
        args.modes,
        args.seed,
        args.random_repeats,
        args.batch_size,
    )
    layer = args.histogram_layer
    if layer is None:
        layer = max(range(len(targets)), key=lambda i: float(scores[targets[i]].max()))
    layer %= len(targets)
    name = targets[layer]
    top = torch.sort(scores[name], descending=True, stable=True).indices[: args.histogram_neurons]
    pre, post = pre_post_activations(model, calib[: args.histogram_windows], name, top, args.batch_size)

    with atomic_output_dir(args.output_dir, args.overwrite, inputs=[args.model]) as out:
        summary = {
            "model": args.model,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **table.to_dict(),
            "wd_top": {
                t: {
                    "neurons": torch.sort(scores[t], descending=True, stable=True).indices[:10].tolist(),
                    "wd": torch.sort(scores[t], descending=True).values[:10].tolist(),
                }
                for t in targets
            },
            "seconds": time.perf_counter() - started,
        }
        (out / "ablation.json").write_text(json.dumps(summary, indent=2))
        with open(out / "ablation.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["mode", "selection", "percent", "seed", "neurons_per_layer", "perplexity", "ratio"]
            )
            writer.writerow(["none", "none", 0, args.seed, 0, f"{table.baseline_perplexity:.6f}", "1.000000"])
            for r in table.rows:
                writer.writerow(
                    [
                        r.mode,
                        r.selection,
                        r.percent,
                        r.seed,
                        r.neurons_per_layer,
                        f"{r.perplexity:.6f}",
                        f"{r.ratio_to_baseline:.6f}",
                    ]
                )
        plot_ablation_curves(
            table, out / "ablation.png", title=f"{args.model}: negative-computation ablation"
        )
        labels = [f"{name} #{int(n)} WD {float(scores[name][n]):.3f}" for n in top]
        plot_activation_histograms(
            pre, post, labels, out / "histograms.png", title=f"top WD neurons of layer {layer}"
        )
    print(table.markdown())
    logger.info("wrote %s in %.0f s", args.output_dir, time.perf_counter() - started)
    return 0
