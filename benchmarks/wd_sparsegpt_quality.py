"""Token perplexity of SmolLM2 pruned by stock SparseGPT and by WD-aware SparseGPT, with controls.

Every variant runs ``oneshot`` on the same calibration windows (the package's
calibration split) and is scored with ``token_perplexity`` on the disjoint
evaluation split. WD-aware and the control scores (kurtosis, variance, OWL
outliers, random) spend exactly the zeros of uniform SparseGPT, so a reader can
see whether WD itself is what helps.

    flock /tmp/heavy.lock python benchmarks/wd_sparsegpt_quality.py
    flock /tmp/heavy.lock python benchmarks/wd_sparsegpt_quality.py --only stock@0.7 wd@0.7

Variant names: ``dense``, ``stock@S``, ``<score>[-<allocation>]@S`` with score
in wd/kurtosis/variance/owl/random, allocation rows (default)/layers/both and
``S`` a sparsity (0.5) or an N:M structure (2:4).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, cast

import torch

DEFAULT_VARIANTS = [
    # most informative first: the output is printed as it goes
    "dense",
    "stock@0.5",
    "wd@0.5",
    "stock@0.7",
    "wd@0.7",
    "random@0.7",
    "kurtosis@0.7",
    "variance@0.7",
    "owl@0.7",
    "owl-layers@0.7",
    "wd-layers@0.7",
    "stock@0.6",
    "wd@0.6",
    "stock@2:4",
    "wd@2:4",
]


def build_modifier(variant: str, strength: float, max_layer_shift: float):
    """A modifier instance for a variant name (None for dense)."""
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    if variant == "dense":
        return None
    kind, _, level = variant.partition("@")
    structure: dict[str, Any] = (
        {"mask_structure": level, "sparsity": 0.5} if ":" in level else {"sparsity": float(level)}
    )
    common: dict[str, Any] = {"targets": ["Linear"], "ignore": ["re:.*lm_head"], **structure}
    if kind == "stock":
        return SparseGPTModifier(**common)
    score, _, mode = kind.partition("-")
    return WassersteinSparseGPTModifier(
        **common,
        wd_strength=strength,
        score=cast(Any, score),  # validated by the modifier's pydantic Literal field
        allocation=cast(Any, mode or "rows"),
        max_layer_shift=max_layer_shift,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", default=DEFAULT_VARIANTS, help="variants to run (see module doc)"
    )
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument(
        "--strength", type=float, default=1.0, help="wd_strength of WD-aware and control variants"
    )
    parser.add_argument("--max-layer-shift", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from sparse_expansion_plugin.compression import run_oneshot
    from sparse_expansion_plugin.data import load_model_and_tokenizer, token_windows
    from sparse_expansion_plugin.data.calibration import calibration_dataset
    from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

    _, tokenizer = load_model_and_tokenizer()
    calibration = calibration_dataset(tokenizer, args.num_calibration_samples, args.seq_len)
    windows = token_windows(tokenizer, "evaluation", args.seq_len, args.eval_windows)
    print(
        f"# SmolLM2-135M, calibration {args.num_calibration_samples}x{args.seq_len} tokens, "
        f"evaluation {args.eval_windows}x{args.seq_len} tokens (disjoint), wd_strength {args.strength}",
        flush=True,
    )
    rows = []
    stock_ppl: dict[str, float] = {}
    for variant in args.only:
        model, _ = load_model_and_tokenizer()
        modifier = build_modifier(variant, args.strength, args.max_layer_shift)
        seconds = 0.0
        if modifier is not None:
            # seed=None: this script seeds once, above, for the whole run; re-seeding per variant changes its figures.
            seconds = run_oneshot(
                model,
                tokenizer,
                [modifier],
                args.num_calibration_samples,
                args.seq_len,
                seed=None,
                dataset=calibration,
            )
        ppl = token_perplexity(model, windows, batch_size=4, progress=False)
        linears = [
            m.weight
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        ]
        zeros = sum(int((w == 0).sum()) for w in linears)
        level = variant.partition("@")[2]
        if variant.startswith("stock@"):
            stock_ppl[level] = ppl
        ref = stock_ppl.get(level)
        row = {
            "variant": variant,
            "ppl": ppl,
            "vs_stock": (ppl / ref - 1.0) if ref and not variant.startswith("stock@") else None,
            "zeros": zeros,
            "sparsity": zeros / sum(w.numel() for w in linears),
            "seconds": seconds,
        }
        rows.append(row)
        vs = f"{100 * row['vs_stock']:+.1f}%" if row["vs_stock"] is not None else ""
        print(
            f"{variant:18s} ppl {ppl:9.3f} {vs:>8s}  zeros {zeros:>10d} ({row['sparsity']:.4f})  {seconds:6.1f}s",
            flush=True,
        )
        del model
    print("\n| variant | token ppl | vs stock | zeros | compress s |\n|---|---|---|---|---|")
    for row in rows:
        vs = f"{100 * row['vs_stock']:+.1f}%" if row["vs_stock"] is not None else ""
        print(f"| {row['variant']} | {row['ppl']:.3f} | {vs} | {row['zeros']} | {row['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(math.isfinite(r["ppl"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
