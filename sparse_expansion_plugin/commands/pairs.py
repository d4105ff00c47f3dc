"""``sparse-expansion pairs MODEL --layer L``: the token pairs a layer's most entangled neurons separate most.

Runs the appendix-A procedure of the negative-computation paper
(``analysis.pairs``) over every FFN layer and writes to a new directory:
``pairs.json`` (layer L's top neurons by MD, each with its highest-OI token
pairs as token strings, next tokens and the side of the output each falls
on; the cross-layer z-score matrices), ``zscores.csv``, ``zscores.png`` and
``pairs.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from sparse_expansion_plugin.commands.arguments import nonnegative_int, positive_int, sequence_length

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default="smollm2-135m", help="HF name or directory (default: smollm2-135m)"
    )
    parser.add_argument(
        "--layer", type=int, required=True, help="FFN layer index (negative counts from the end)"
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="new directory for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument(
        "--windows", type=positive_int, default=16, help="text windows the pairs are drawn from"
    )
    parser.add_argument("--seq-len", type=sequence_length, default=512)
    parser.add_argument("--split", default="evaluation", choices=["calibration", "evaluation"])
    parser.add_argument(
        "--sources", default="python_docs,jargon_file", help="text sources (bundled or hub names)"
    )
    parser.add_argument(
        "--num-pairs", type=positive_int, default=1000, help="random token pairs (2x distinct tokens)"
    )
    parser.add_argument(
        "--neurons", type=positive_int, default=10, help="most entangled neurons per layer (by MD)"
    )
    parser.add_argument(
        "--pairs-per-neuron", type=positive_int, default=10, help="highest-OI pairs kept per neuron"
    )
    parser.add_argument(
        "--projection", default=None, help="FFN input to analyse, e.g. up_proj (default: gate)"
    )
    parser.add_argument("--plot-neurons", type=positive_int, default=4, help="neurons drawn in pairs.png")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--seed", type=nonnegative_int, default=0)


def run(args: argparse.Namespace) -> int:
    from sparse_expansion_plugin.analysis.ablation_plots import plot_neuron_pairs, plot_zscores
    from sparse_expansion_plugin.analysis.pairs import analyze_pairs, pair_modules, pair_records
    from sparse_expansion_plugin.data.locations import check_seq_len, checked_model_location
    from sparse_expansion_plugin.data.models import load_model_and_tokenizer
    from sparse_expansion_plugin.data.text import token_windows
    from sparse_expansion_plugin.outputs import atomic_output_dir, check_output_dir

    check_output_dir(args.output_dir, args.overwrite, [args.model])
    location = checked_model_location(args.model)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(location)
    names = pair_modules(model, args.projection)
    if not -len(names) <= args.layer < len(names):
        raise ValueError(
            f"--layer {args.layer} is out of range: the model has {len(names)} FFN layers (0..{len(names) - 1})"
        )
    check_seq_len(model.config.to_dict(), args.seq_len)  # after --layer: both before any work
    layer = args.layer % len(names)
    windows = token_windows(tokenizer, args.split, args.seq_len, args.windows, args.sources)
    analysis = analyze_pairs(
        model,
        windows,
        args.num_pairs,
        args.neurons,
        args.pairs_per_neuron,
        args.seed,
        args.projection,
        args.batch_size,
    )
    records = pair_records(analysis, layer, windows, tokenizer)
    neurons = []
    for rank, neuron in enumerate(analysis.top_neurons[layer].tolist()):
        mine = [r for r in records if r.neuron_rank == rank]
        neurons.append(
            {
                "neuron": neuron,
                "md": float(analysis.md[layer][neuron]),
                "pairs": [
                    {
                        "tokens": list(r.tokens),
                        "next_tokens": list(r.next_tokens),
                        "token_ids": list(r.token_ids),
                        "positions": list(r.positions),
                        "oi_ratio": r.oi_ratio,
                        "outputs": list(r.outputs),
                        "sides": list(r.sides),
                        "input_distance": r.input_distance,
                    }
                    for r in mine
                ],
            }
        )
    negative = sum(s == "negative" for r in records for s in r.sides)
    with atomic_output_dir(args.output_dir, args.overwrite, inputs=[args.model]) as out:
        summary = {
            "model": args.model,
            "layer": layer,
            "module": names[layer],
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "negative_fraction_of_pair_tokens": negative / max(1, 2 * len(records)),
            "neurons": neurons,
            "layer_names": analysis.layer_names,
            "zscores": analysis.zscores.tolist(),
            "zscores_normalized": analysis.normalized.tolist(),
            "input_distance_z": analysis.input_distance_z.tolist(),
            "layer_pair_zscores": analysis.pair_zscores[layer].tolist(),
            "seconds": time.perf_counter() - started,
        }
        (out / "pairs.json").write_text(json.dumps(summary, indent=2))
        with open(out / "zscores.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source_layer", *range(len(names))])
            for s, row in enumerate(analysis.zscores.tolist()):
                writer.writerow([s, *(f"{v:.6f}" for v in row)])
        plot_zscores(analysis, out / "zscores.png", layer)
        plot_neuron_pairs(analysis, layer, out / "pairs.png", args.plot_neurons)
    print(
        f"layer {layer} ({names[layer]}): {negative} of {2 * len(records)} pair tokens on the negative side"
    )
    for n in neurons[:5]:
        print(f"neuron {n['neuron']} (MD {n['md']:.2f}):")
        for p in n["pairs"][:5]:
            print(
                f"  {p['tokens'][0]!r:>14} {p['tokens'][1]!r:>14}   next {p['next_tokens'][0]!r:>12} "
                f"{p['next_tokens'][1]!r:>12}   OI {p['oi_ratio']:6.2f}  {p['sides'][0][:3]}/{p['sides'][1][:3]}"
            )
    logger.info("wrote %s in %.0f s", args.output_dir, time.perf_counter() - started)
    return 0
