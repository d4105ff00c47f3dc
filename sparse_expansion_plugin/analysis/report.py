"""Turn per-neuron statistics into tables: one row per neuron, one per layer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from scipy.stats import spearmanr

from sparse_expansion_plugin.analysis.capture import NeuronStatistics

NEURON_COLUMNS = (
    "layer",
    "neuron",
    "wd",
    "wd_error_bound",
    "mapping_difficulty",
    "skewness",
    "excess_kurtosis",
    "variance",
)


def write_neuron_table(stats: dict[str, NeuronStatistics], path: Path) -> None:
    """CSV with one row per (layer, neuron): every statistic, machine-readable."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NEURON_COLUMNS)
        for name, s in stats.items():
            columns = [
                s.wd,
                s.wd_error_bound,
                s.mapping_difficulty,
                s.skewness,
                s.excess_kurtosis,
                s.variance,
            ]
            rows = torch.stack([c.double() for c in columns], dim=1).tolist()
            for neuron, values in enumerate(rows):
                writer.writerow([name, neuron, *(f"{v:.6g}" for v in values)])


def layer_summary(stats: dict[str, NeuronStatistics], threshold: float) -> list[dict[str, float | int | str]]:
    """Per layer: mean / max WD, how many neurons exceed ``threshold``, MD, and how WD ranks against the baselines."""
    rows: list[dict[str, float | int | str]] = []
    for name, s in stats.items():
        wd = s.wd.double()
        rows.append(
            {
                "layer": name,
                "neurons": int(wd.numel()),
                "tokens": s.tokens,
                "mean_wd": wd.mean().item(),
                "max_wd": wd.max().item(),
                "top_neuron": int(wd.argmax().item()),
                f"neurons_wd_above_{threshold:g}": int((wd > threshold).sum().item()),
                "max_wd_error_bound": s.wd_error_bound.max().item(),
                "mean_md": torch.nanmean(s.mapping_difficulty.double()).item(),
                "max_md": s.mapping_difficulty.double().nan_to_num(-1.0).max().item(),
                "mean_excess_kurtosis": s.excess_kurtosis.double().mean().item(),
                "spearman_wd_md": float(
                    spearmanr(wd.numpy(), s.mapping_difficulty.numpy(), nan_policy="omit")[0]
                ),
                "spearman_wd_kurtosis": float(spearmanr(wd.numpy(), s.excess_kurtosis.numpy())[0]),
            }
        )
    return rows


def write_summary(rows: list[dict[str, float | int | str]], directory: Path, meta: dict[str, object]) -> None:
    """``summary.csv`` (one row per layer) and ``summary.json`` (the same plus run metadata)."""
    with (directory / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (directory / "summary.json").write_text(json.dumps({"meta": meta, "layers": rows}, indent=2))
