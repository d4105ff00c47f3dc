"""Peak memory of one MLP block's Sparse Expansion against the number of calibration tokens.

One decoder layer with SmolLM2-135M's shapes (hidden 576, intermediate 1536; random
weights: memory does not depend on the values) is expanded into K experts by
``SparseExpansionModifier`` fed batches of ``8 x 512`` tokens through its hooks,
exactly as llm-compressor's pipeline feeds them (``_one_layer.py``, shared with
``plan_check.py``). Each setting runs in a fresh process on one thread and reports
that process's peak RSS above its own baseline (model built, nothing fed), so the
figures do not contaminate each other.

``--router-fit-tokens none`` keeps every calibration input until the layer ends
(0.1.0's behaviour, memory grows with the tokens); a number fits the router on
that many tokens and streams the rest into the K Hessians (memory flat).

    python benchmarks/sparse_expansion_memory.py --tokens 32768 131072 262144 --router-fit-tokens none 16384
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _one_layer import build_expansion, feed_and_compress, peak_rss_bytes, run_child

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M


def one_setting(tokens: int, router_fit_tokens: int | None, experts: int, batch: int, seq: int) -> dict:
    """Run in a child process: expand one layer on ``tokens`` synthetic calibration tokens."""
    import torch

    modifier, mlp = build_expansion(
        HIDDEN, INTERMEDIATE, num_experts=experts, router_fit_tokens=router_fit_tokens
    )
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    feed_and_compress(modifier, mlp, tokens, batch, seq, torch.Generator().manual_seed(1))
    return {
        "tokens": tokens,
        "router_fit_tokens": router_fit_tokens,
        "experts": experts,
        "peak_rss_above_baseline_gib": (peak_rss_bytes() - baseline) / 2**30,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--router-fit-tokens", nargs="+", default=["none", "16384"])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tokens, fit, experts, batch, seq = args.child.split(",")
        result = one_setting(
            int(tokens), None if fit == "none" else int(fit), int(experts), int(batch), int(seq)
        )
        print(json.dumps(result))
        return 0
    rows = []
    for fit in args.router_fit_tokens:
        for tokens in args.tokens:
            child = f"{tokens},{fit},{args.experts},{args.batch},{args.seq_len}"
            rows.append(run_child(__file__, child))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nOne SmolLM2-shaped MLP block, K = {args.experts}, batches of {args.batch}x{args.seq_len} tokens\n"
    )
    print("| router_fit_tokens | calibration tokens | peak RSS above baseline | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['router_fit_tokens'] or 'all (keep every input)'} | {r['tokens']:,} | "
            f"{r['peak_rss_above_baseline_gib']:.2f} GiB | {r['seconds']:.0f} |"
        )
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
