"""The ``analyze`` job as a library function: statistics, tables and plots into one directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparse_expansion_plugin.analysis.capture import NeuronStatistics, collect_neuron_statistics
from sparse_expansion_plugin.analysis.plots import plot_top_neurons, plot_wd_across_layers
from sparse_expansion_plugin.analysis.report import layer_summary, write_neuron_table, write_summary
from sparse_expansion_plugin.data.text import SOURCES, token_windows
from sparse_expansion_plugin.modeling.targets import matching_names, select_linears
from sparse_expansion_plugin.outputs import atomic_output_dir

logger = logging.getLogger(__name__)


@dataclass
class AnalysisConfig:
    """What to analyse and how much text to use (defaults: every FFN input projection, 16x512 tokens)."""

    layers: list[str] | None = None
    num_windows: int = 16
    seq_len: int = 512
    split: str = "calibration"
    sources: tuple[str, ...] = SOURCES
    batch_size: int = 4
    num_pairs: int = 1000
    seed: int = 0
    threshold: float = 0.1
    plot_layer: str | None = None
    top: int = 25


def analyze_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    config: AnalysisConfig | None = None,
    overwrite: bool = False,
) -> dict[str, NeuronStatistics]:
    """Compute WD (streaming), MD, skewness and kurtosis per neuron and write the report.

    Writes ``neurons.csv``, ``summary.csv``, ``summary.json``,
    ``wd_by_layer.png`` and ``top_neurons.png`` atomically: a failure leaves
    ``output_dir`` as it was.
    """
    config = config or AnalysisConfig()
    names = select_linears(model, config.layers)
    plot_layer = _resolve_plot_layer(names, config.plot_layer)
    windows = token_windows(tokenizer, config.split, config.seq_len, config.num_windows, config.sources)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        start = time.perf_counter()
        stats = collect_neuron_statistics(
            model, windows, names, config.batch_size, config.num_pairs, config.seed
        )
        seconds = time.perf_counter() - start
        write_neuron_table(stats, tmp / "neurons.csv")
        rows = layer_summary(stats, config.threshold)
        meta = {
            "model": str(getattr(model.config, "name_or_path", "")),
            "tokens": int(windows.numel()),
            "windows": int(windows.shape[0]),
            "seq_len": config.seq_len,
            "split": config.split,
            "sources": list(config.sources),
            "num_pairs": config.num_pairs,
            "seed": config.seed,
            "threshold": config.threshold,
            "seconds": round(seconds, 2),
            "plot_layer": plot_layer,
            "wd_method": "streaming (histogram, 1024 bins); bound per neuron in neurons.csv",
        }
        write_summary(rows, tmp, meta)
        plot_wd_across_layers(stats, tmp / "wd_by_layer.png")
        top = plot_top_neurons(stats[plot_layer], tmp / "top_neurons.png", config.top)
        (tmp / "top_neurons.json").write_text(json.dumps({"layer": plot_layer, "neurons": top}))
    best = max(rows, key=lambda r: float(r["max_wd"]))
    logger.info(
        "analysed %d layers over %d tokens in %.1f s; highest WD %.3f in %s; report in %s",
        len(stats),
        windows.numel(),
        seconds,
        best["max_wd"],
        best["layer"],
        output_dir,
    )
    return stats


def _resolve_plot_layer(names: list[str], wanted: str | None) -> str:
    """The layer whose top neurons are plotted: a position in ``names`` or a ``name_matches`` pattern (default: first)."""
    if wanted is None:
        return names[0]
    if wanted.lstrip("-").isdigit():
        index = int(wanted)
        if not -len(names) <= index < len(names):
            raise ValueError(f"plot layer index {index} is out of range: {len(names)} layers are analysed")
        return names[index]
    return matching_names(names, wanted, what="plot layer")[0]


def gaussian_reference_wd(tokens: int, seed: int = 0) -> float:
    """WD of a standard normal sample of ``tokens`` values: the noise floor of a WD measurement."""
    generator = torch.Generator().manual_seed(seed)
    from sparse_expansion_plugin.metrics.wasserstein import wd_exact

    return wd_exact(torch.randn(tokens, 1, generator=generator, dtype=torch.float64)).item()
