"""Per-neuron statistics of linear layers, streamed through forward hooks.

One pass over the text: every hooked linear feeds its outputs ``[tokens,
neurons]`` to a ``StreamingWD`` (which also keeps the moments) and keeps the
inputs of a fixed sample of token positions, from which the mapping
difficulty is computed at the end (the outputs there are recomputed by the
module itself, so only inputs are stored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sparse_expansion_plugin.analysis.hooks import hooks_attached, model_device, run_windows
from sparse_expansion_plugin.metrics.mapping import oi_ratios, sample_token_pairs
from sparse_expansion_plugin.metrics.wasserstein import StreamingWD

logger = logging.getLogger(__name__)


@dataclass
class NeuronStatistics:
    """Per-neuron statistics of one linear layer; every tensor is ``[neurons]`` float64."""

    name: str
    wd: torch.Tensor
    wd_error_bound: torch.Tensor
    mapping_difficulty: torch.Tensor
    skewness: torch.Tensor
    excess_kurtosis: torch.Tensor
    variance: torch.Tensor
    tokens: int
    histogram: StreamingWD = field(repr=False)


class _LayerRecorder:
    """Forward hook state for one linear: streaming WD/moments plus sampled inputs."""

    def __init__(self, name: str, module: nn.Module, sample_positions: torch.Tensor, num_bins: int) -> None:
        self.name = name
        self.module = module
        self.sample_positions = sample_positions  # sorted global token positions whose inputs we keep
        self.num_bins = num_bins
        self.stats: StreamingWD | None = None
        self.sampled_inputs: list[torch.Tensor] = []
        self.seen = 0

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = args[0].detach()
        y = output.detach()
        x = x.reshape(-1, x.shape[-1])
        y = y.reshape(-1, y.shape[-1])
        if not torch.isfinite(y).all():
            raise ValueError(f"layer {self.name} produced NaN or inf activations; WD is undefined there")
        if self.stats is None:
            self.stats = StreamingWD(y.shape[1], num_bins=self.num_bins)
        self.stats.update(y)
        start, stop = self.seen, self.seen + x.shape[0]
        lo, hi = torch.searchsorted(self.sample_positions, torch.tensor([start, stop]))
        if hi > lo:
            self.sampled_inputs.append(x[self.sample_positions[lo:hi] - start].float().cpu())
        self.seen = stop


@torch.no_grad()
def collect_neuron_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    layer_names: list[str],
    batch_size: int = 8,
    num_pairs: int = 1000,
    seed: int = 0,
    num_bins: int = 1024,
    progress: bool = True,
) -> dict[str, NeuronStatistics]:
    """Run ``windows [n, L]`` through ``model`` and return statistics of each named linear.

    ``num_pairs`` token pairs (``2 * num_pairs`` distinct positions, seeded)
    are shared by every layer, so MD values are comparable across layers.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__}")
    if not layer_names:
        raise ValueError("no layers to analyse")
    total_tokens = windows.numel()
    pairs = sample_token_pairs(total_tokens, num_pairs, seed)
    positions, inverse = torch.unique(pairs.view(-1), sorted=True, return_inverse=True)
    local_pairs = inverse.view(-1, 2)
    recorders = {name: _LayerRecorder(name, modules[name], positions, num_bins) for name in layer_names}
    with hooks_attached((rec.module, rec) for rec in recorders.values()):
        run_windows(model, windows, batch_size, "analyse", progress)
    device = model_device(model)
    results = {}
    for name, rec in recorders.items():
        assert rec.stats is not None and rec.stats.moments is not None
        inputs = torch.cat(rec.sampled_inputs).to(device)
        param = next(rec.module.parameters())
        outputs = rec.module(inputs.to(param.dtype)).float()
        md = torch.nanmean(oi_ratios(inputs, outputs, local_pairs.to(device)), dim=0).cpu()
        moments = rec.stats.moments
        results[name] = NeuronStatistics(
            name=name,
            wd=rec.stats.wd().cpu(),
            wd_error_bound=rec.stats.error_bound().cpu(),
            mapping_difficulty=md,
            skewness=moments.skewness().cpu(),
            excess_kurtosis=moments.excess_kurtosis().cpu(),
            variance=moments.variance().cpu(),
            tokens=rec.stats.count,
            histogram=rec.stats,
        )
    logger.info("collected statistics of %d layers over %d tokens", len(results), total_tokens)
    return results


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    windows: torch.Tensor,
    layer_names: list[str],
    batch_size: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs ``[tokens, d_in]`` and outputs ``[tokens, neurons]`` of each named linear, kept in memory.

    For small runs and notebooks (memory grows with tokens); ``collect_neuron_statistics``
    streams instead.
    """
    modules = dict(model.named_modules())
    store: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name in layer_names}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            store[name][0].append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())
            store[name][1].append(output.detach().reshape(-1, output.shape[-1]).cpu())

        return hook

    for name in layer_names:
        if name not in modules:
            raise ValueError(f"no module named {name!r} in {type(model).__name__}")
    with hooks_attached((modules[name], hook_for(name)) for name in layer_names):
        run_windows(model, windows, batch_size, "capture", progress=False)
    return {name: (torch.cat(xs), torch.cat(ys)) for name, (xs, ys) in store.items()}
