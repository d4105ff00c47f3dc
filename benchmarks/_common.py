"""Timing and memory helpers every benchmark measures with, so their figures mean the same thing.

Imported as ``from _common import ...``: the benchmarks run as
``python benchmarks/<name>.py``, which puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def batched_forward_seconds(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Wall time of one forward pass over all ``windows: [n, seq_len]``, ``batch_size`` at a time."""
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def median_forward_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward of ``ids: [batch, seq_len]`` over ``repeats`` runs, after a warm-up.

    On CUDA the device is synchronised around each run, or the time would be
    that of queueing the kernels.
    """
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
