"""Sparse Expansion speed on a real model (default: the embedded SmolLM2-135M), all ratios in one process.

1. Compression: wall time of ``oneshot`` with K experts against stock SparseGPT
   (same MLP targets, same calibration windows, run back to back).
2. Inference: forward time of the expanded model on a batch of B x L tokens
   against the dense model, with experts unpacked per call (compact, the
   default) and with dense expert copies (``materialize_experts``); on CUDA too
   when a GPU is present.

    flock /tmp/heavy.lock python benchmarks/sparse_expansion_speed.py \
        --calibration-samples 32 --experts 16 --output bench-se/speed.json

``--mlp-only`` times one MLP block of the model's shape (random 50% experts,
router fitted on random inputs) against the dense block: a cheap (< 30 s) check
of the routed layer itself, without compressing the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from _common import median_forward_seconds, peak_rss_gib

from sparse_expansion_plugin.compression import run_oneshot
from sparse_expansion_plugin.data.calibration import calibration_dataset
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.outputs import atomic_write_text

MLP_TARGETS = [r"re:.*mlp\.(gate|up|down)_proj$"]
logger = logging.getLogger("sparse_expansion_speed")


@torch.no_grad()
def mlp_block_ratios(model_name: str, experts: int, tokens: int, repeats: int) -> dict[str, float]:
    """Forward time of one expanded MLP block / the dense block, compact and materialized."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sparse_expansion_plugin.data.models import resolve_model_path
    from sparse_expansion_plugin.sparse_expansion.block import install_expanded_block
    from sparse_expansion_plugin.sparse_expansion.clustering import fit_router
    from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, materialize_experts

    config = AutoConfig.from_pretrained(resolve_model_path(model_name))
    torch.manual_seed(0)
    dense = LlamaMLP(config).eval()
    x = torch.randn(1, tokens, config.hidden_size)
    mlp = LlamaMLP(config).eval()
    router_in = fit_router(x[0, :4096], experts, max(1, config.hidden_size // 32)).router
    router_down = fit_router(
        torch.randn(4096, config.intermediate_size), experts, config.intermediate_size // 32
    ).router
    layers = {}
    for name, own_router in (("gate_proj", None), ("up_proj", None), ("down_proj", router_down)):
        weight = getattr(dense, name).weight
        keep = torch.rand(experts, *weight.shape) > 0.5
        layers[name] = ExpandedLinear.from_experts(
            weight.expand(experts, -1, -1) * keep, own_router, keep=keep
        )
    install_expanded_block(mlp, "", layers, router_in)  # gate/up routed by the block, down by its own

    def seconds(module: torch.nn.Module) -> float:
        module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x.clone())  # a new tensor each call, as in a model
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    dense_s = seconds(dense)
    compact_s = seconds(mlp)
    materialize_experts(mlp)
    materialized_s = seconds(mlp)
    return {
        "mlp_dense_s": dense_s,
        "mlp_ratio_compact": compact_s / dense_s,
        "mlp_ratio_materialized": materialized_s / dense_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-compression-baseline", action="store_true", help="time only the expanded run")
    parser.add_argument("--mlp-only", action="store_true", help="only time one MLP block (cheap)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mlp_only:
        ratios = mlp_block_ratios(args.model, args.experts, args.forward_batch * args.seq_len, args.repeats)
        print(
            f"one MLP block, {args.forward_batch}x{args.seq_len} tokens, K={args.experts}, "
            f"{torch.get_num_threads()} threads: dense {ratios['mlp_dense_s'] * 1e3:.0f} ms; expanded "
            f"compact {ratios['mlp_ratio_compact']:.2f}x, materialized {ratios['mlp_ratio_materialized']:.2f}x"
        )
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
    from sparse_expansion_plugin.sparse_expansion.layer import materialize_experts
    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    dense, tokenizer = load_model_and_tokenizer(args.model)
    calibration = calibration_dataset(tokenizer, args.calibration_samples, args.seq_len)
    result: dict[str, float | dict] = {"threads": torch.get_num_threads()}
    # Both runs calibrate on the same windows in the same order (same seed): only the method differs.
    if not args.skip_compression_baseline:
        stock = SparseGPTModifier(sparsity=0.5, targets=MLP_TARGETS)
        model, processor = load_model_and_tokenizer(args.model)
        stock_s = run_oneshot(
            model, processor, [stock], args.calibration_samples, args.seq_len, args.seed, dataset=calibration
        )
        del model
        result["sparsegpt_compress_s"] = stock_s
    se = SparseExpansionModifier(num_experts=args.experts, sparsity=0.5, seed=args.seed)
    expanded, processor = load_model_and_tokenizer(args.model)
    se_s = run_oneshot(
        expanded, processor, [se], args.calibration_samples, args.seq_len, args.seed, dataset=calibration
    )
    result["se_compress_s"] = se_s
    if "sparsegpt_compress_s" in result:
        result["compress_ratio"] = se_s / result["sparsegpt_compress_s"]
    result["cost"] = expansion_cost(expanded).as_dict()

    ids = token_windows(tokenizer, "evaluation", args.seq_len, args.forward_batch)
    dense_s = median_forward_seconds(dense, ids, args.repeats)
    compact_s = median_forward_seconds(expanded, ids, args.repeats)
    result.update(
        dense_forward_s=dense_s, se_forward_compact_s=compact_s, forward_ratio_compact=compact_s / dense_s
    )
    result["materialized_bytes"] = materialize_experts(expanded)
    dense_s2 = median_forward_seconds(dense, ids, args.repeats)
    mat_s = median_forward_seconds(expanded, ids, args.repeats)
    result.update(se_forward_materialized_s=mat_s, forward_ratio_materialized=mat_s / dense_s2)
    if torch.cuda.is_available():
        cuda_ids = ids.cuda()
        dense.cuda()
        expanded.cuda()
        d = median_forward_seconds(dense, cuda_ids, args.repeats)
        m = median_forward_seconds(expanded, cuda_ids, args.repeats)
        materialize_experts(expanded, enable=False)
        c = median_forward_seconds(expanded, cuda_ids, args.repeats)
        result.update(cuda_dense_s=d, cuda_ratio_materialized=m / d, cuda_ratio_compact=c / d)
    result["peak_rss_gb"] = peak_rss_gib()

    print(
        f"\nSparse Expansion speed: {args.model}, K={args.experts}, {args.calibration_samples}x{args.seq_len} "
        f"calibration tokens, {torch.get_num_threads()} threads"
    )
    if "compress_ratio" in result:
        print(
            f"compression: SparseGPT {result['sparsegpt_compress_s']:.0f} s, Sparse Expansion {se_s:.0f} s, "
            f"ratio {result['compress_ratio']:.2f}x"
        )
    print(
        f"forward {args.forward_batch}x{args.seq_len}: dense {dense_s:.2f} s; expanded compact "
        f"{compact_s:.2f} s ({result['forward_ratio_compact']:.2f}x), materialized {mat_s:.2f} s "
        f"({result['forward_ratio_materialized']:.2f}x, +{result['materialized_bytes'] / 1e9:.2f} GB)"
    )
    if "cuda_dense_s" in result:
        print(
            f"CUDA forward: materialized {result['cuda_ratio_materialized']:.2f}x, "
            f"compact {result['cuda_ratio_compact']:.2f}x dense"
        )
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB")
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
