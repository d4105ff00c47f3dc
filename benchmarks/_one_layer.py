"""One decoder layer expanded in a fresh process: what the memory benchmarks measure with.

``plan_check.py`` (the planner against measured memory) and
``sparse_expansion_memory.py`` (memory against calibration tokens) both build a
one-layer Llama with a real model's FFN shapes, feed ``SparseExpansionModifier``
synthetic batches through its hooks as llm-compressor's pipeline does, and read the
child process's peak RSS. Keeping that here means both report the same thing.

Imported as ``from _one_layer import ...`` (the benchmarks run as ``python
benchmarks/<name>.py``, which puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LIVE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""Environment of a child whose RSS follows live tensors (glibc returns every freed block >= 64 KiB)."""

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Children compute on one thread: the figure is memory, and on a loaded 2-core machine OpenMP's
spinning threads made ``torch.cholesky_inverse`` of ``[4, 1536, 1536]`` take 45 s instead of 0.2 s."""


def one_layer_config(hidden: int, intermediate: int) -> Any:
    """A one-decoder-layer Llama config with these FFN shapes (the vocabulary is tiny: it is not measured)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 192),
    )


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``). Why not ``ru_maxrss``: Linux carries the forking parent's
    peak across ``exec`` into it, so a child started from a big process (a long pytest run) would
    report the parent's peak and see no growth at all."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def feed_and_compress(modifier: Any, mlp: Any, tokens: int, batch: int, seq: int, gen: Any) -> None:
    """Feed ``tokens`` synthetic tokens through the modifier's hooks (as the pipeline does), then compress.

    The down projection sees the block's real intermediate activations of each batch.
    """
    import torch

    hidden = mlp.gate_proj.in_features
    with torch.no_grad():
        for _ in range(tokens // (batch * seq)):
            x = torch.randn(batch, seq, hidden, generator=gen)
            modifier.calibrate_module(mlp.gate_proj, (x,), None)
            h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            modifier.calibrate_module(mlp.down_proj, (h,), None)
            del x, h
        modifier.compress_modules()


def build_expansion(hidden: int, intermediate: int, **modifier_fields: Any) -> tuple[Any, Any]:
    """(modifier initialised on a fresh one-layer model, that layer's MLP), seeded."""
    import torch
    from llmcompressor.core import State
    from transformers import LlamaForCausalLM

    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    torch.manual_seed(0)
    model = LlamaForCausalLM(one_layer_config(hidden, intermediate)).eval()
    modifier = SparseExpansionModifier(materialize_while_calibrating=False, **modifier_fields)
    modifier.on_initialize(State(model=model))
    return modifier, model.model.layers[0].mlp


def warm_up() -> None:
    """Run one tiny expansion so BLAS, OpenMP and scikit-learn allocate their one-time buffers now,
    before the baseline is read, and are not counted as the measured expansion's."""
    import torch

    modifier, mlp = build_expansion(32, 64, num_experts=2, router_fit_tokens=256)
    feed_and_compress(modifier, mlp, 512, 2, 128, torch.Generator().manual_seed(0))


def run_child(script: str | Path, child_argument: str, live_allocator: bool = False) -> dict[str, Any]:
    """Run ``script --child child_argument`` in a fresh interpreter on one thread; return its last JSON line.

    ``live_allocator`` makes glibc return every freed block to the system, so the
    child's RSS follows live tensors; otherwise glibc's default is kept (it keeps
    freed blocks under its dynamic mmap threshold, up to 32 MiB, in the heap).
    """
    env = {**os.environ, **ONE_THREAD}
    for key in LIVE_ALLOCATOR:
        env.pop(key, None)
    if live_allocator:
        env.update(LIVE_ALLOCATOR)
    out = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--child", child_argument],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
