"""PNG plots of an analysis: top Wasserstein neurons against N(0,1), and WD across layers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import norm  # noqa: E402

from sparse_expansion_plugin.analysis.capture import NeuronStatistics  # noqa: E402


def standardized_histogram(
    stats: NeuronStatistics, neuron: int, bins: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """Density of one neuron's standardised outputs rebinned from its streaming histogram: (edges, density)."""
    hist = stats.histogram
    assert (
        hist.lo is not None
        and hist.width is not None
        and hist.counts is not None
        and hist.moments is not None
    )
    mean = hist.moments.mean()[neuron].item()
    sigma = max(hist.moments.variance()[neuron].sqrt().item(), 1e-12)
    centres = hist.lo[neuron].item() + (np.arange(hist.num_bins) + 0.5) * hist.width[neuron].item()
    z = (centres - mean) / sigma
    counts = hist.counts[neuron, 1:-1].double().numpy()
    edges = np.linspace(-5, 5, bins + 1)
    density, _ = np.histogram(z, bins=edges, weights=counts)
    total = hist.counts[neuron].sum().item()
    return edges, density / max(total, 1) / np.diff(edges)


def plot_top_neurons(stats: NeuronStatistics, path: Path, top: int = 25) -> list[int]:
    """Grid of the ``top`` highest-WD neurons' standardised output histograms against N(0,1)."""
    order = torch.argsort(stats.wd, descending=True)[:top].tolist()
    cols = 5
    rows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    grid = np.linspace(-5, 5, 200)
    for ax, neuron in zip(axes.flat, order, strict=False):
        edges, density = standardized_histogram(stats, neuron)
        ax.stairs(density, edges, fill=True, alpha=0.6, color="tab:blue")
        ax.plot(grid, norm.pdf(grid), color="black", lw=1)
        ax.set_title(f"#{neuron}  WD {stats.wd[neuron]:.3f}", fontsize=9)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    fig.suptitle(f"{stats.name}: top {len(order)} Wasserstein neurons (standardised outputs vs N(0,1))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return order


def plot_wd_across_layers(stats: dict[str, NeuronStatistics], path: Path) -> None:
    """Mean, 99th percentile and max WD per analysed layer, in model order."""
    names = list(stats)
    wd = [s.wd.double() for s in stats.values()]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    ax.plot(x, [w.max().item() for w in wd], "o-", label="max")
    ax.plot(x, [torch.quantile(w, 0.99).item() for w in wd], "s-", label="99th percentile")
    ax.plot(x, [w.mean().item() for w in wd], "^-", label="mean")
    ax.set_xticks(x)
    ax.set_xticklabels(
        [n.replace("model.layers.", "").replace(".mlp", "") for n in names], rotation=90, fontsize=7
    )
    ax.set_ylabel("WD to N(0,1)")
    ax.set_title("Wasserstein distance of FFN neurons across layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
