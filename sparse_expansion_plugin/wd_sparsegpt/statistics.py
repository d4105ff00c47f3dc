"""Streaming per-neuron statistics for the WD-aware modifier's scores, fed from calibration hooks.

Used twice with the same rules: in the sequential calibration (row or column
scores of each module) and in the dense pre-pass of ``allocation: layers``
(layer scores). Only every ``stride``-th token is kept, with an offset that
rotates from call to call so position 0 (attention-sink tokens) is not
over-sampled; SparseGPT's Hessian still sees every token.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from sparse_expansion_plugin.metrics.moments import StreamingMoments
from sparse_expansion_plugin.metrics.wasserstein import StreamingWD

STATISTIC_SCORES = ("wd", "kurtosis", "variance")


class ScoreStatistics:
    """One streaming statistic per key (a module or its name) for a score in ``STATISTIC_SCORES``."""

    def __init__(self, score: str, stride: int, num_bins: int) -> None:
        if score not in STATISTIC_SCORES:
            raise ValueError(f"score {score!r} has no streaming statistic; choose from {STATISTIC_SCORES}")
        if stride < 1:
            raise ValueError(f"token stride must be at least 1, got {stride}")
        self.score = score
        self.stride = stride
        self.num_bins = num_bins
        self._stats: dict[Hashable, StreamingWD | StreamingMoments] = {}
        self._calls: dict[Hashable, int] = {}

    def update(self, key: Hashable, values: torch.Tensor) -> None:
        """Add ``values [..., features]`` (every ``stride``-th row, rotating offset) to ``key``'s statistic."""
        flat = values.detach().reshape(-1, values.shape[-1])
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        flat = flat[call % self.stride :: self.stride]
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = (
                StreamingWD(flat.shape[1], num_bins=self.num_bins, device=flat.device)
                if self.score == "wd"
                else StreamingMoments(flat.shape[1])
            )
        stats.update(flat)

    def pop(self, key: Hashable, what: str) -> torch.Tensor:
        """``key``'s score per feature, ``[features]`` float32 on the CPU, freeing its statistic.

        Raises naming ``what`` (the module) when no values were ever added for it.
        """
        stats = self._stats.pop(key, None)
        self._calls.pop(key, None)
        if stats is None:
            raise RuntimeError(f"no calibration statistics were collected for {what}")
        if isinstance(stats, StreamingWD):
            return stats.wd().float().cpu()
        if self.score == "kurtosis":
            return stats.excess_kurtosis().float().cpu()
        return stats.variance().float().cpu()
