"""Figures for the negative-computation ablation and the token-pair analysis (PNG via matplotlib Agg).

Each function takes plain results (tables, tensors) and a path, draws one
figure and closes it, so commands and notebooks can call them alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sparse_expansion_plugin.analysis.ablation import MODES, SELECTIONS, AblationTable  # noqa: E402
from sparse_expansion_plugin.analysis.pairs import PairAnalysis, check_layer  # noqa: E402

COLORS = {"top": "tab:red", "random": "tab:gray", "bottom": "tab:blue"}


def plot_ablation_curves(table: AblationTable, path: str | Path, title: str = "") -> Path:
    """Perplexity against p (log x) for top / random / bottom, one panel per mode; baseline dashed."""
    modes = [m for m in MODES if any(r.mode == m for r in table.rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for selection in SELECTIONS:
            rows = [r for r in table.rows if r.mode == mode and r.selection == selection]
            if not rows:
                continue
            percents = sorted({r.percent for r in rows})
            means, errs = [], []
            for p in percents:
                vals = torch.tensor([r.perplexity for r in rows if r.percent == p], dtype=torch.float64)
                means.append(vals.mean().item())
                errs.append(vals.std().item() if len(vals) > 1 else 0.0)
            ax.errorbar(
                percents, means, yerr=errs, marker="o", capsize=3, color=COLORS[selection], label=selection
            )
        ax.axhline(table.baseline_perplexity, color="black", linestyle="--", linewidth=1, label="no ablation")
        ax.set_xscale("log")
        percents = sorted({r.percent for r in table.rows})
        ax.set_xticks(percents, [f"{p:g}" for p in percents])
        ax.set_xlabel("neurons ablated per layer (% by WD)")
        ax.set_ylabel("token perplexity")
        what = "pre-activation clamped to >= 0" if mode == "clamp" else "pre-activation sign flipped"
        ax.set_title(f"{mode}: {what}", fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_activation_histograms(
    pre: torch.Tensor,
    post: torch.Tensor | None,
    labels: Sequence[str],
    path: str | Path,
    bins: int = 100,
    title: str = "",
) -> Path:
    """Pre- and post-activation histograms, one row per neuron: ``pre [tokens, k]``, ``post [tokens, k]`` or None.

    The negative region (x < 0) is shaded: that is what the clamp removes.
    """
    k = pre.shape[1]
    if len(labels) != k:
        raise ValueError(f"{len(labels)} labels for {k} neurons")
    cols = 1 if post is None else 2
    fig, axes = plt.subplots(k, cols, figsize=(5 * cols, 1.9 * k), squeeze=False)
    for i in range(k):
        panels = [("pre-activation", pre[:, i])] + ([] if post is None else [("post-activation", post[:, i])])
        for j, (kind, values) in enumerate(panels):
            ax = axes[i][j]
            v = values.float().numpy()
            ax.hist(v, bins=bins, color="tab:purple", alpha=0.85)
            lo = min(float(v.min()), 0.0)
            ax.axvspan(lo, 0.0, color="tab:red", alpha=0.12, label="negative region")
            ax.axvline(0.0, color="tab:red", linewidth=0.8)
            neg = float((values < 0).double().mean())
            ax.set_title(f"{labels[i]}: {kind} ({100 * neg:.0f}% < 0)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_zscores(analysis: PairAnalysis, path: str | Path, layer: int | None = None) -> Path:
    """Heatmap of normalised cross-layer z-scores (source layer x layer) and the input-distance z-scores."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    mat = analysis.normalized.numpy()
    finite = mat[~(mat != mat)]
    vmax = max(1.0, float(abs(finite).max())) if finite.size else 1.0
    im = ax1.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax1, label="z-score / z-score at source layer")
    ax1.set_xlabel("layer whose entangled neurons score the pairs")
    ax1.set_ylabel("source layer of the high-OI pairs")
    ax1.set_title("cross-layer z-scores of high-OI pairs (normalised)", fontsize=10)
    if layer is not None:
        row = check_layer(analysis, layer)
        ax1.axhline(row - 0.5, color="black", linewidth=1)
        ax1.axhline(row + 0.5, color="black", linewidth=1)
    ax2.bar(range(len(analysis.input_distance_z)), analysis.input_distance_z.numpy(), color="tab:green")
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean z-score of input distance")
    ax2.set_title("input distances of high-OI pairs vs all pairs", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_neuron_pairs(analysis: PairAnalysis, layer: int, path: str | Path, neurons: int = 4) -> Path:
    """For the layer's most entangled neurons: IO relationship of all pairs (top pairs highlighted) and
    where the top pairs' tokens fall in the neuron's output distribution."""
    layer = check_layer(analysis, layer)
    k = min(neurons, analysis.top_neurons[layer].numel())
    fig, axes = plt.subplots(k, 2, figsize=(11, 3 * k), squeeze=False)
    dx = analysis.input_distances[layer]
    dx = dx / dx.max()
    pool = analysis.pools[layer]
    for rank in range(k):
        neuron = int(analysis.top_neurons[layer][rank])
        y = analysis.top_outputs[layer][:, rank].double()
        dy = (y[0::2] - y[1::2]).abs()
        dy = dy / dy.median().clamp_min(1e-12)
        top = pool[pool[:, 0] == rank, 1]
        ax = axes[rank][0]
        ax.scatter(dx.numpy(), dy.numpy(), s=4, color="tab:gray", alpha=0.5, label="all pairs")
        ax.scatter(dx[top].numpy(), dy[top].numpy(), s=14, color="tab:red", label="top OI pairs")
        ax.set_xlabel("input distance / max")
        ax.set_ylabel("output distance / median")
        md = float(analysis.md[layer][neuron])
        ax.set_title(f"layer {layer} neuron {neuron} (MD {md:.2f}): IO relationship", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[rank][1]
        ax.hist(y.numpy(), bins=60, color="tab:purple", alpha=0.6)
        lo = min(float(y.min()), 0.0)
        ax.axvspan(lo, 0.0, color="tab:red", alpha=0.1)
        for p in top.tolist():
            for v in (y[2 * p], y[2 * p + 1]):
                ax.axvline(float(v), color="tab:red", linewidth=0.8, alpha=0.7)
        neg = sum(int(y[2 * p] < 0) + int(y[2 * p + 1] < 0) for p in top.tolist())
        ax.set_title(f"top-pair tokens in the output: {neg} of {2 * len(top)} negative", fontsize=9)
        ax.set_xlabel("pre-activation")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_ablation_curves", "plot_activation_histograms", "plot_neuron_pairs", "plot_zscores"]
