"""Negative-computation ablation on a real model (default: the embedded SmolLM2-135M).

Scores every FFN gate projection's neurons by WD on calibration windows
(``analysis.capture`` via ``ablation.wd_scores``), then measures token
perplexity on evaluation windows with the top / random / bottom p% of each
layer's gate pre-activations clamped to >= 0 (and, with ``--modes clamp
flip``, sign-flipped). Prints a Markdown table, the time of one ablated
evaluation as a ratio to the unablated one run in the same process, and the
peak resident memory. Run it under ``flock /tmp/heavy.lock`` on shared CPUs:

    flock /tmp/heavy.lock python benchmarks/negative_computation.py \
        --calibration-windows 32 --eval-windows 40 --random-repeats 3 --output-dir bench-nc
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from _common import peak_rss_gib

from sparse_expansion_plugin.analysis.ablation import ablation_targets, evaluate_ablation, wd_scores
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--percents", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--modes", nargs="+", default=["clamp", "flip"], choices=["clamp", "flip"])
    parser.add_argument("--random-repeats", type=int, default=3, help="random selections per p for clamp")
    parser.add_argument("--flip-random-repeats", type=int, default=1, help="random selections per p for flip")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None, help="also write JSON and plots here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on an oversubscribed host)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        # On a shared, oversubscribed CPU, OpenMP threads spin against each other: measured here a
        # 2x128-token SmolLM2 forward took 14.8 s with 2 threads and 1.2 s with 1.
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    model, tokenizer = load_model_and_tokenizer(args.model)
    calibration = token_windows(tokenizer, "calibration", args.seq_len, args.calibration_windows)
    evaluation = token_windows(tokenizer, "evaluation", args.seq_len, args.eval_windows)
    targets = ablation_targets(model)
    start = time.perf_counter()
    scores = wd_scores(model, calibration, targets, args.batch_size)
    wd_seconds = time.perf_counter() - start

    start = time.perf_counter()
    baseline = token_perplexity(model, evaluation, args.batch_size)
    baseline_seconds = time.perf_counter() - start

    tables = []
    ablated_seconds, evaluations = 0.0, 0
    for mode in args.modes:
        repeats = args.random_repeats if mode == "clamp" else args.flip_random_repeats
        start = time.perf_counter()
        table = evaluate_ablation(
            model, evaluation, scores, args.percents, modes=[mode], seed=args.seed,
            random_repeats=repeats, batch_size=args.batch_size,
        )  # fmt: skip
        ablated_seconds += time.perf_counter() - start
        evaluations += len(table.rows) + 1  # + its own baseline
        if table.baseline_perplexity != baseline:
            raise RuntimeError(f"baseline not reproducible: {table.baseline_perplexity} vs {baseline}")
        tables.append(table)
    merged = tables[0]
    for t in tables[1:]:
        merged.rows.extend(t.rows)

    peak_mb = peak_rss_gib() * 1024
    max_wd = {i: float(scores[n].max()) for i, n in enumerate(targets)}
    print()
    print(f"model {args.model}: {len(targets)} gate projections of {scores[targets[0]].numel()} neurons")
    print(f"WD from {args.calibration_windows}x{args.seq_len} calibration tokens in {wd_seconds:.0f} s; "
          f"max WD {max(max_wd.values()):.3f} (layer {max(max_wd, key=max_wd.__getitem__)})")  # fmt: skip
    print(f"perplexity on {args.eval_windows}x{args.seq_len} evaluation tokens (python_docs + jargon_file)")
    print(merged.markdown())
    per_eval = ablated_seconds / evaluations
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"\ntime per evaluation: unablated {baseline_seconds:.1f} s, with hooks {per_eval:.1f} s "
          f"(ratio {per_eval / baseline_seconds:.2f}); peak RSS {peak_mb:.0f} MB")  # fmt: skip
    if args.output_dir is not None:
        from sparse_expansion_plugin.analysis.ablation import pre_post_activations
        from sparse_expansion_plugin.analysis.ablation_plots import (
            plot_ablation_curves,
            plot_activation_histograms,
        )

        args.output_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            **merged.to_dict(),
            "max_wd_per_layer": max_wd,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        (args.output_dir / "negative_computation.json").write_text(json.dumps(summary, indent=2))
        plot_ablation_curves(merged, args.output_dir / "negative_computation.png", title=args.model)
        # Pre/post-activation histograms of the top WD neurons: the layer holding the largest WD, and layer 1.
        for layer in sorted({max(max_wd, key=max_wd.__getitem__), min(1, len(targets) - 1)}):
            name = targets[layer]
            top = torch.sort(scores[name], descending=True, stable=True).indices[:6]
            pre, post = pre_post_activations(model, calibration[:4], name, top, args.batch_size)
            labels = [f"layer {layer} #{int(n)} WD {float(scores[name][n]):.3f}" for n in top]
            plot_activation_histograms(pre, post, labels, args.output_dir / f"histograms_layer{layer}.png")


if __name__ == "__main__":
    main()
