"""Sparse Expansion speed on a real model (default: the embedded SmolLM2-135M), all ratios in one process.

1. Compression: wall time of ``oneshot`` with K experts against stock SparseGPT
   (same MLP targets, same calibration windows, run back to back).
2. Inference, each against the dense model, with the bytes each form holds:
   the forward of B x L tokens and one-token decoding (KV cache, batch 1, time
   per token), with packed experts (unpacked per call, as ``load_expanded``
   returns the model) and with dense expert copies (``materialize_experts``);
   and the packed model's memory as a share of the dense model's.
   On CUDA too when a GPU is present.

    flock /tmp/heavy.lock python benchmarks/sparse_expansion_speed.py \
        --calibration-samples 32 --experts 16 --output bench-se/speed.json

Inference only, quickly (small calibration, no SparseGPT run):

    flock /tmp/heavy.lock python benchmarks/sparse_expansion_speed.py \
        --calibration-samples 8 --skip-compression-baseline

``--mlp-only`` times one MLP block of the model's shape (random 50% experts,
router fitted on random inputs) against the dense block: a cheap (< 30 s) check
of the routed layer itself, without compressing the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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
def decode_seconds_per_token(model: torch.nn.Module, ids: torch.Tensor, prompt: int, steps: int) -> float:
    """Median time of one decoding step (one new token, KV cache, batch 1) after a ``prompt``-token prefill.

    The tokens fed are ``ids``' own (teacher forcing), so every model decodes the same sequence.
    """
    row = ids[:1]
    if row.shape[1] < prompt + steps:
        raise ValueError(
            f"decoding needs {prompt + steps} tokens per window, the windows have {row.shape[1]}"
        )
    times: list[float] = []
    for _ in range(2):  # the first pass warms up; its times are dropped
        times.clear()
        past = model(input_ids=row[:, :prompt], use_cache=True).past_key_values
        for i in range(prompt, prompt + steps):
            if row.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            past = model(input_ids=row[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
            if row.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def inference_ratios(
    dense: torch.nn.Module, expanded: torch.nn.Module, ids: torch.Tensor, repeats: int, decode_steps: int
) -> dict[str, float]:
    """Forward and decode times of ``expanded`` packed, then materialized, each over ``dense``'s."""
    from sparse_expansion_plugin.sparse_expansion.layer import materialize_experts

    prompt = 16
    result: dict[str, float] = {"dense_bytes": held_bytes(dense), "packed_bytes": held_bytes(expanded)}
    result["packed_share_of_dense"] = result["packed_bytes"] / result["dense_bytes"]
    for form in ("packed", "materialized"):
        if form == "materialized":
            result["materialized_bytes"] = result["packed_bytes"] + materialize_experts(expanded)
        # dense timed next to each form: the machine's load drifts between them
        dense_s = median_forward_seconds(dense, ids, repeats)
        form_s = median_forward_seconds(expanded, ids, repeats)
        dense_decode = decode_seconds_per_token(dense, ids, prompt, decode_steps)
        form_decode = decode_seconds_per_token(expanded, ids, prompt, decode_steps)
        result.update(
            {
                f"dense_forward_s_{form}": dense_s,
                f"{form}_forward_s": form_s,
                f"{form}_forward_ratio": form_s / dense_s,
                f"dense_decode_s_{form}": dense_decode,
                f"{form}_decode_s": form_decode,
                f"{form}_decode_ratio": form_decode / dense_decode,
            }
        )
    materialize_experts(expanded, enable=False)
    return result


def print_inference(result: dict[str, float], where: str, batch: int, seq_len: int) -> None:
    gib = 2**30
    print(f"{where}: forward {batch}x{seq_len} tokens and one-token decode, each / dense")
    print(f"  {'form':<13} {'forward':>8} {'decode':>8} {'held GiB':>9}")
    print(f"  {'dense':<13} {'1.00x':>8} {'1.00x':>8} {result['dense_bytes'] / gib:>9.3f}")
    for form in ("packed", "materialized"):
        print(
            f"  {form:<13} {result[f'{form}_forward_ratio']:>7.2f}x {result[f'{form}_decode_ratio']:>7.2f}x "
            f"{result[f'{form}_bytes'] / gib:>9.3f}"
        )
    print(
        f"  dense: forward {result['dense_forward_s_packed']:.2f} s, decode "
        f"{result['dense_decode_s_packed'] * 1e3:.1f} ms/token; packed model = "
        f"{result['packed_share_of_dense']:.2f} of the dense model's bytes"
    )


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

    def seconds(module: torch.nn.Module, inputs: torch.Tensor, repeats: int) -> float:
        module(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(inputs.clone())  # a new tensor each call, as in a model
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one_token = [x[:, i : i + 1] for i in range(0, tokens, max(1, tokens // 16))][:16]

    def decode_seconds(module: torch.nn.Module) -> float:
        """Median over 16 single tokens (routed to various experts), 5 calls each."""
        return statistics.median(seconds(module, token, 5) for token in one_token)

    dense_s, dense_decode = seconds(dense, x, repeats), decode_seconds(dense)
    compact_s, compact_decode = seconds(mlp, x, repeats), decode_seconds(mlp)
    materialize_experts(mlp)
    materialized_s, materialized_decode = seconds(mlp, x, repeats), decode_seconds(mlp)
    return {
        "mlp_dense_s": dense_s,
        "mlp_ratio_compact": compact_s / dense_s,
        "mlp_ratio_materialized": materialized_s / dense_s,
        "mlp_dense_decode_s": dense_decode,
        "mlp_decode_ratio_compact": compact_decode / dense_decode,
        "mlp_decode_ratio_materialized": materialized_decode / dense_decode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16, help="one-token steps timed per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-compression-baseline", action="store_true", help="time only the expanded run")
    parser.add_argument("--mlp-only", action="store_true", help="only time one MLP block (cheap)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mlp_only:
        ratios = mlp_block_ratios(args.model, args.experts, args.forward_batch * args.seq_len, args.repeats)
        print(
            f"one MLP block, {args.forward_batch}x{args.seq_len} tokens, K={args.experts}, "
            f"{torch.get_num_threads()} threads: dense {ratios['mlp_dense_s'] * 1e3:.0f} ms; expanded "
            f"compact {ratios['mlp_ratio_compact']:.2f}x, materialized {ratios['mlp_ratio_materialized']:.2f}x; "
            f"one token: dense {ratios['mlp_dense_decode_s'] * 1e3:.2f} ms; expanded compact "
            f"{ratios['mlp_decode_ratio_compact']:.2f}x, materialized {ratios['mlp_decode_ratio_materialized']:.2f}x"
        )
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
    from sparse_expansion_plugin.sparse_expansion.model import load_expanded, save_expanded
    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    dense, tokenizer = load_model_and_tokenizer(args.model)
    calibration = calibration_dataset(tokenizer, args.calibration_samples, args.seq_len)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
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

    # time the model as users get it: saved and loaded back (packed experts, nothing materialized)
    with tempfile.TemporaryDirectory(prefix="se-speed-") as saved:
        save_expanded(expanded, None, Path(saved) / "model")
        loaded = load_expanded(Path(saved) / "model")
    ids = token_windows(tokenizer, "evaluation", args.seq_len, args.forward_batch)
    del expanded
    result["cpu"] = inference_ratios(dense, loaded, ids, args.repeats, args.decode_steps)
    if torch.cuda.is_available():
        models: list[torch.nn.Module] = [dense, loaded]
        for module in models:
            module.cuda()
        result["cuda"] = inference_ratios(dense, loaded, ids.cuda(), args.repeats, args.decode_steps)
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
    print_inference(result["cpu"], "CPU", args.forward_batch, args.seq_len)
    if "cuda" in result:
        print_inference(result["cuda"], "CUDA", args.forward_batch, args.seq_len)
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB")
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
