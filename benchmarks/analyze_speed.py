"""Throughput of ``analyze`` against the plain forward pass over the same tokens, in one process.

Goal (issue 2): the statistics cost at most as much again as the forward
itself, i.e. analyze time / forward time <= 2.0. Prints tokens/s of both, the
ratio, and peak memory (RSS).

    python benchmarks/analyze_speed.py --windows 100 --seq-len 512   # 51,200 tokens
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import batched_forward_seconds, peak_rss_gib

from sparse_expansion_plugin.analysis.capture import collect_neuron_statistics
from sparse_expansion_plugin.data import load_model_and_tokenizer, token_windows
from sparse_expansion_plugin.modeling.targets import select_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=1000)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = token_windows(tokenizer, "calibration", args.seq_len, args.windows)
    names = select_linears(model)
    tokens = windows.numel()
    batched_forward_seconds(model, windows[: args.batch_size], args.batch_size)  # warm-up
    rss_before = peak_rss_gib()
    # Alternate forward and analyze halves so that machine load drifts hit both alike.
    t_forward = batched_forward_seconds(model, windows, args.batch_size)
    start = time.perf_counter()
    collect_neuron_statistics(model, windows, names, args.batch_size, args.pairs, progress=False)
    t_analyze = time.perf_counter() - start
    t_forward = min(t_forward, batched_forward_seconds(model, windows, args.batch_size))
    print(
        f"model {args.model}: {len(names)} FFN input projections, {tokens} tokens, {torch.get_num_threads()} threads"
    )
    print(f"forward only : {tokens / t_forward:10.1f} tokens/s ({t_forward:.1f} s)")
    print(f"analyze      : {tokens / t_analyze:10.1f} tokens/s ({t_analyze:.1f} s)")
    print(
        f"analyze / forward time: {t_analyze / t_forward:.2f}x (goal <= 2.0x: statistics cost at most the forward again)"
    )
    print(f"peak RSS: {peak_rss_gib():.2f} GiB (after model load and warm-up: {rss_before:.2f} GiB)")


if __name__ == "__main__":
    main()
