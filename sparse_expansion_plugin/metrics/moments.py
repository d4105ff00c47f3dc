"""Per-neuron moments: variance, skewness and excess kurtosis, exact or streaming.

Skewness and kurtosis are the obvious non-Gaussianity baselines a reviewer will
ask WD to beat. Streaming sums are kept in float64 around a fixed shift (the
first batch's mean) so that raw power sums do not cancel catastrophically.
"""

from __future__ import annotations

import torch


class StreamingMoments:
    """Running count, mean and central moments 2-4 of ``[tokens, neurons]`` batches."""

    def __init__(self, num_neurons: int, shift: torch.Tensor | None = None) -> None:
        self.num_neurons = num_neurons
        self.shift = shift
        self.count = 0
        self.sums: torch.Tensor | None = None  # [4, neurons]: sum of d, d^2, d^3, d^4 with d = x - shift

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_neurons:
            raise ValueError(f"expected [tokens, {self.num_neurons}], got {tuple(x.shape)}")
        if self.shift is None:
            self.shift = x.double().mean(dim=0)
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        d = work - self.shift.to(work.dtype)
        self.add_power_sums(power_sums(d), x.shape[0])

    def add_power_sums(self, sums: torch.Tensor, count: int) -> None:
        """Add ``[4, neurons]`` sums of ``d, d^2, d^3, d^4`` (``d = x - shift``) over ``count`` values."""
        if self.sums is None:
            self.sums = torch.zeros(4, self.num_neurons, dtype=torch.float64, device=sums.device)
        self.sums += sums.double()
        self.count += count

    def _central(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sums is None or self.count == 0:
            raise ValueError("no values seen yet")
        n = float(self.count)
        m1, m2, m3, m4 = (s / n for s in self.sums)
        c2 = (m2 - m1**2).clamp_min(0.0)
        c3 = m3 - 3 * m1 * m2 + 2 * m1**3
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        return m1, c2, c3, c4

    def mean(self) -> torch.Tensor:
        assert self.shift is not None
        return self._central()[0] + self.shift

    def variance(self) -> torch.Tensor:
        """Population variance per neuron, ``[neurons]``."""
        return self._central()[1]

    def skewness(self) -> torch.Tensor:
        """Population (biased) skewness, as ``scipy.stats.skew(bias=True)``; 0 for a constant neuron."""
        _, c2, c3, _ = self._central()
        return torch.where(c2 > 0, c3 / c2.clamp_min(1e-300) ** 1.5, torch.zeros_like(c2))

    def excess_kurtosis(self) -> torch.Tensor:
        """Population excess kurtosis, as ``scipy.stats.kurtosis(fisher=True, bias=True)``; 0 if constant."""
        _, c2, _, c4 = self._central()
        return torch.where(c2 > 0, c4 / c2.clamp_min(1e-300) ** 2 - 3.0, torch.zeros_like(c2))


def power_sums(d: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``[4, neurons]`` column sums of ``d, d^2, d^3, d^4`` for ``d [tokens, neurons]``.

    Hot path of ``analyze``: computed in the input precision (float32 for
    activations: 5x faster than float64, and the caller's shift keeps values
    small) and accumulated across batches in float64 by the caller.
    ``scratch [2, tokens, neurons]`` lets a caller reuse memory: fresh
    multi-MB temporaries on every call fragment glibc's heap (RSS grew by
    1 GB per batch in ``analyze`` before this).
    """
    if scratch is None:
        scratch = torch.empty((2, *d.shape), dtype=d.dtype, device=d.device)
    d2 = torch.mul(d, d, out=scratch[0])
    higher = torch.mul(d2, d, out=scratch[1])
    out = torch.empty(4, d.shape[1], dtype=d.dtype, device=d.device)
    torch.sum(d, dim=0, out=out[0])
    torch.sum(d2, dim=0, out=out[1])
    torch.sum(higher, dim=0, out=out[2])
    torch.sum(torch.mul(d2, d2, out=higher), dim=0, out=out[3])
    return out


def _exact(outputs: torch.Tensor) -> StreamingMoments:
    acc = StreamingMoments(outputs.shape[1], shift=outputs.double().mean(dim=0))
    acc.update(outputs)
    return acc


def skewness(outputs: torch.Tensor) -> torch.Tensor:
    """Per-neuron skewness of ``outputs [tokens, neurons]`` -> ``[neurons]`` float64."""
    return _exact(outputs).skewness()


def excess_kurtosis(outputs: torch.Tensor) -> torch.Tensor:
    """Per-neuron excess kurtosis (0 for a Gaussian) of ``outputs [tokens, neurons]`` -> ``[neurons]``."""
    return _exact(outputs).excess_kurtosis()
