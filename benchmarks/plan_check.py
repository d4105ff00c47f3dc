"""The memory planner (``sparse-expansion plan``) against the peak memory measured on SmolLM2's shapes.

Each setting runs in a fresh process (``_one_layer.py``, shared with ``sparse_expansion_memory.py``): one
decoder layer with the embedded SmolLM2's FFN shapes (random weights: memory does
not depend on the values) is expanded by ``SparseExpansionModifier`` fed batches of
``8 x 512`` synthetic tokens through its hooks, then ``compress_modules``. The
measured figure is the process's peak RSS (``ru_maxrss``) above its baseline (model
built, and the libraries the expansion touches warmed up on a tiny layer, so their
one-time buffers are not counted as the expansion's), on one thread. Everything runs on the CPU,
so the planned figure is :attr:`LayerPlan.working_peak_bytes` (device and host
working sets of the same moment added; the layer's weights are in the baseline).

Two allocators are measured: glibc as configured by default, which keeps freed
blocks under its dynamic mmap threshold (up to 32 MiB) in the heap, so RSS also
counts memory already freed; and ``MALLOC_MMAP_THRESHOLD_=65536``, which returns
every freed tensor to the system, so RSS follows live tensors, which is what the
planner counts.

    python benchmarks/plan_check.py            # two settings, both allocators
    python benchmarks/plan_check.py --child '{"experts": 4, ...}'   # one measurement (used by tests)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _one_layer import (
    build_expansion,
    feed_and_compress,
    one_layer_config,
    peak_rss_bytes,
    run_child,
    warm_up,
)

SETTINGS: list[dict[str, Any]] = [
    # the modifier's defaults: one router per block; streaming after a fit on 16k tokens
    {"experts": 16, "tokens": 32768, "router_fit_tokens": 16384, "share_router_with_down": True},
    # streaming, the down projection with a router of its own; the peak is the down projection's solve
    {"experts": 16, "tokens": 32768, "router_fit_tokens": 16384, "share_router_with_down": False},
    # every input kept until the layer ends; the peak is the down projection's router fit
    {"experts": 16, "tokens": 32768, "router_fit_tokens": None, "share_router_with_down": False},
]


def measure(
    hidden: int,
    intermediate: int,
    experts: int,
    tokens: int,
    router_fit_tokens: int | None,
    batch: int = 8,
    seq: int = 512,
    share_router_with_down: bool = True,
) -> dict[str, Any]:
    """In this (fresh) process: peak RSS of expanding one layer, above the baseline, in bytes."""
    import torch

    warm_up()
    modifier, mlp = build_expansion(
        hidden,
        intermediate,
        num_experts=experts,
        router_fit_tokens=router_fit_tokens,
        share_router_with_down=None if share_router_with_down else False,  # None: the default
    )
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    feed_and_compress(modifier, mlp, tokens, batch, seq, torch.Generator().manual_seed(1))
    return {"measured_bytes": peak_rss_bytes() - baseline, "seconds": time.perf_counter() - start}


def planned_bytes(
    hidden: int,
    intermediate: int,
    experts: int,
    tokens: int,
    router_fit_tokens: int | None,
    batch_tokens: int,
    share_router_with_down: bool = True,
) -> int:
    """The planner's working peak for the same one-layer expansion (float32, no materialized experts)."""

    from sparse_expansion_plugin.sparse_expansion.plan import plan_expansion

    config = one_layer_config(hidden, intermediate)
    plan = plan_expansion(
        config,
        num_experts=experts,
        calibration_tokens=tokens,
        router_fit_tokens=router_fit_tokens,
        dtype="float32",
        materialize_while_calibrating=False,
        batch_tokens=batch_tokens,
        share_router_with_down=share_router_with_down,
    )
    return plan.layers[0].working_peak_bytes


def measure_in_child(setting: dict[str, Any], live_allocator: bool) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter (``--child``); return its JSON result."""
    return run_child(__file__, json.dumps(setting), live_allocator)


def smollm2_shapes() -> tuple[int, int]:
    """(hidden, intermediate) of the embedded SmolLM2, read from its config.json."""
    from sparse_expansion_plugin.data.locations import read_config, resolve_model_location

    config = read_config(resolve_model_location(None))
    return int(config["hidden_size"]), int(config["intermediate_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.child:
        setting = json.loads(args.child)
        print(json.dumps({**setting, **measure(**setting)}))
        return 0
    hidden, intermediate = smollm2_shapes()
    rows = []
    for setting in SETTINGS:
        full = {"hidden": hidden, "intermediate": intermediate, **setting}
        planned = planned_bytes(**full, batch_tokens=8 * 512)
        for live in (False, True):
            result = measure_in_child(full, live)
            row = {
                **full,
                "allocator": "live (mmap 64 KiB)" if live else "glibc default",
                "planned_bytes": planned,
            }
            row.update(result)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\nOne SmolLM2-shaped layer (hidden {hidden}, intermediate {intermediate}), batches of 8x512 tokens, CPU\n"
    )
    print(
        "| K | tokens | router_fit_tokens | down routed by | allocator | planned | measured (peak RSS) "
        "| planned / measured | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['experts']} | {r['tokens']:,} | {r['router_fit_tokens'] or 'all'} | "
            f"{'the block router' if r['share_router_with_down'] else 'its own router'} | {r['allocator']} | "
            f"{r['planned_bytes'] / 2**20:,.0f} MiB | {r['measured_bytes'] / 2**20:,.0f} MiB | "
            f"{r['planned_bytes'] / r['measured_bytes']:.2f} | {r['seconds']:.0f} |"
        )
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
