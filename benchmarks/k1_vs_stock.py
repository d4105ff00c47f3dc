"""Sparse Expansion with one expert against stock SparseGPT on the real model: where do they differ?

K = 1 runs stock's algorithm (same Hessian accumulation, same mask rule) with our
batched two-level solver, which reassociates the update sums. This compares, per
FFN linear of the first ``--layers`` decoder layers, the keep masks and the
largest weight difference of the two oneshot runs on the same calibration windows.

    python benchmarks/k1_vs_stock.py --layers 4 --calibration-samples 16
"""

from __future__ import annotations

import argparse
from typing import Any

from sparse_expansion_quality import MLP_TARGETS, seeded_calibration

from sparse_expansion_plugin.compression import run_oneshot
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears
from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier


def truncated(layers: int) -> tuple[Any, Any]:
    """The embedded model cut to its first ``layers`` decoder layers, and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(None)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n, seq = args.calibration_samples, args.seq_len
    stock, tokenizer = truncated(args.layers)
    windows = seeded_calibration(tokenizer, n, seq, args.seed, "random")
    run_oneshot(
        stock,
        tokenizer,
        [SparseGPTModifier(sparsity=0.5, targets=MLP_TARGETS)],
        n,
        seq,
        args.seed,
        dataset=windows,
    )
    ours, _ = truncated(args.layers)
    modifier = SparseExpansionModifier(num_experts=1, sparsity=0.5, seed=args.seed)
    run_oneshot(ours, tokenizer, [modifier], n, seq, args.seed, dataset=windows)
    for name, layer in expanded_linears(ours).items():
        reference = stock.get_submodule(name).weight.detach()
        keep = layer.expert_keep_mask(0)
        difference = float((layer.expert_weight(0) - reference).abs().max())
        print(
            f"{name}: mask mismatches {int((keep != (reference != 0)).sum())} of {keep.numel()}, "
            f"max |dw| {difference:.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
