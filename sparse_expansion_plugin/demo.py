"""The README's main job: analyse, compress two ways, evaluate, and print one table.

On the embedded default (SmolLM2-135M, bundled text, no network):

1. ``analyze``: per-neuron WD / MD report of every FFN input projection;
2. stock SparseGPT at ``sparsity`` on the FFN linears, through ``oneshot``;
3. Sparse Expansion with ``num_experts`` experts at the same sparsity, same
   linears, same calibration windows;
4. token perplexity of dense, SparseGPT and Sparse Expansion on held-out
   windows of each evaluation text, with stored bytes of the FFN linears and
   compression time; a table on stdout, ``results.json`` / ``results.csv`` and
   ``results.png`` in the output directory (written atomically).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_expansion_plugin.analysis.analyze import AnalysisConfig, analyze_model
from sparse_expansion_plugin.compression import release_weights, run_oneshot
from sparse_expansion_plugin.data.locations import checked_model_location
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.data.text import SOURCES, token_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
from sparse_expansion_plugin.modeling.targets import ffn_blocks, ffn_target_regex, module_weight
from sparse_expansion_plugin.outputs import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)


DEMO_SE_OPTIONS: dict[str, Any] = {"soft_hessian_scale": 0.5}
"""SparseExpansionModifier fields the demo sets beyond K and sparsity (chosen by measurement, README).

Why soft Hessians here and not in the modifier's defaults: they stand in for calibration text where
text is short. At the demo's 32x512 tokens they closed more of the gap on average over 3 seeds; at
64x512 they were a wash (README, "Soft Hessians in the modifier, on the full model", has the table).
"""


@dataclass
class DemoConfig:
    """Sizes of the demo run; the defaults take about 9 minutes on 2 quiet CPU cores.

    Why 32 calibration windows: Sparse Expansion's gain grows with calibration text
    (each of K experts fits its own Hessian), and 32x512 tokens is what fits the
    README's 10-minute budget (8 min 42 s measured; 16 windows took 6 min and closed
    21% / 15% of the gap instead of 32% / 23%).
    """

    model: str = "smollm2-135m"
    sparsity: float = 0.5
    num_experts: int = 16
    calibration_samples: int = 32
    seq_len: int = 512
    eval_windows: int = 12
    analysis_windows: int = 8
    seed: int = 0
    se_options: dict[str, Any] = field(default_factory=lambda: dict(DEMO_SE_OPTIONS))

    def __post_init__(self) -> None:
        """Refuse impossible sizes at once (a negative count used to mean "all but N")."""
        if isinstance(self.sparsity, bool) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (0.5 prunes half), got {self.sparsity!r}")
        for name in ("num_experts", "calibration_samples", "eval_windows", "analysis_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (tokens per window), got {self.seq_len!r}")


def _ffn_bytes(model: torch.nn.Module, compact: bool) -> int:
    """Bytes of the FFN linears of a dense or pruned model (``cost.linear_storage_bytes`` each)."""
    from sparse_expansion_plugin.sparse_expansion.cost import linear_storage_bytes

    return sum(
        linear_storage_bytes(module_weight(model.get_submodule(name)), compact)
        for block in ffn_blocks(model)
        for name in (*block.inputs, *([block.output] if block.output else []))
    )


def _ffn_flops(model: torch.nn.Module) -> int:
    """FLOPs per token of the FFN linears with a dense kernel (2 per weight); pruning keeps this."""
    return sum(
        2 * module_weight(model.get_submodule(name)).numel()
        for block in ffn_blocks(model)
        for name in (*block.inputs, *([block.output] if block.output else []))
    )


def run_demo(
    output_dir: str | Path, config: DemoConfig | None = None, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Run the whole demo; returns the table rows (also written to ``output_dir``)."""
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
    from sparse_expansion_plugin.sparse_expansion.model import save_expanded
    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    config = config or DemoConfig()
    # Everything that can be wrong with the arguments fails here, in a second, before any work.
    check_output_dir(output_dir, overwrite, [config.model])
    config.model = str(checked_model_location(config.model, config.seq_len))
    rows: list[dict[str, Any]] = []
    with atomic_output_dir(output_dir, overwrite, inputs=[config.model]) as tmp:
        dense, tokenizer = load_model_and_tokenizer(config.model)
        logger.info("step 1/4: analyse the FFN input projections")
        analysis = AnalysisConfig(
            num_windows=config.analysis_windows,
            seq_len=config.seq_len,
            num_pairs=min(1000, config.analysis_windows * config.seq_len // 2),
        )
        analyze_model(dense, tokenizer, tmp / "analysis", analysis)
        evaluation = {
            s: token_windows(tokenizer, "evaluation", config.seq_len, config.eval_windows, (s,))
            for s in SOURCES
        }
        targets = [ffn_target_regex(dense)]

        def record(
            name: str, model: torch.nn.Module, seconds: float | None, stored: int, flops: int, **extra: Any
        ) -> None:
            row: dict[str, Any] = {"model": name}
            for source, windows in evaluation.items():
                row[f"ppl_{source}"] = token_perplexity(model, windows, batch_size=4)
            row["ffn_bytes"] = stored
            row["ffn_mflops_per_token"] = flops / 1e6
            row["compress_s"] = seconds
            row.update(extra)
            rows.append(row)
            logger.info("%s: %s", name, {k: v for k, v in row.items() if k.startswith("ppl")})

        logger.info("step 2/4: evaluate the dense model")
        dense_flops = _ffn_flops(dense)
        record("dense", dense, None, _ffn_bytes(dense, compact=False), dense_flops)
        del dense

        logger.info("step 3/4: stock SparseGPT %.0f%% on the FFN linears", 100 * config.sparsity)
        sgpt = SparseGPTModifier(sparsity=config.sparsity, mask_structure="0:0", targets=targets)
        model, tokenizer = load_model_and_tokenizer(config.model)
        seconds = run_oneshot(
            model, tokenizer, [sgpt], config.calibration_samples, config.seq_len, config.seed
        )
        record(
            f"SparseGPT {config.sparsity:.0%}", model, seconds, _ffn_bytes(model, compact=True), dense_flops
        )
        type(model).save_pretrained(model, tmp / "sparsegpt")
        tokenizer.save_pretrained(tmp / "sparsegpt")
        release_weights(model)  # ``del`` alone would leave it in memory next to the expanded model
        del model

        logger.info(
            "step 4/4: Sparse Expansion, %d experts at %.0f%%, options %s",
            config.num_experts,
            100 * config.sparsity,
            config.se_options or "(modifier defaults)",
        )
        se = SparseExpansionModifier(
            sparsity=config.sparsity, num_experts=config.num_experts, seed=config.seed, **config.se_options
        )
        model, tokenizer = load_model_and_tokenizer(config.model)
        seconds = run_oneshot(model, tokenizer, [se], config.calibration_samples, config.seq_len, config.seed)
        cost = expansion_cost(model)
        record(
            f"Sparse Expansion K={config.num_experts}",
            model,
            seconds,
            cost.expanded_bytes,
            cost.routed_flops_per_token_dense_kernel,
            clusters=se.cluster_summary(),
        )
        save_expanded(model, tokenizer, tmp / "sparse_expansion")

        _write_results(tmp, rows, config)
    print(format_table(rows))
    print(
        f"\nwritten to {output_dir}: results.csv, results.json, results.png, analysis/, sparsegpt/, sparse_expansion/"
    )
    return rows


def gap_closed(rows: list[dict[str, Any]], source: str) -> float:
    """Share of SparseGPT's log-perplexity gap to dense that Sparse Expansion closes (1 = all of it)."""
    import math

    dense, sgpt, se = (math.log(r[f"ppl_{source}"]) for r in rows[:3])
    return (sgpt - se) / (sgpt - dense) if sgpt != dense else float("nan")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's table as fixed-width text."""
    header = (
        f"{'model':<26}"
        + "".join(f"{'ppl ' + s:>20}" for s in SOURCES)
        + f"{'FFN MB':>10}{'MFLOP/token':>13}{'compress s':>12}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ppl = "".join(f"{row[f'ppl_{s}']:>20.3f}" for s in SOURCES)
        seconds = "" if row["compress_s"] is None else f"{row['compress_s']:.0f}"
        flops = f"{row['ffn_mflops_per_token']:.1f}" if "ffn_mflops_per_token" in row else ""
        lines.append(f"{row['model']:<26}{ppl}{row['ffn_bytes'] / 2**20:>10.1f}{flops:>13}{seconds:>12}")
    if len(rows) == 3:
        closed = ", ".join(f"{s} {100 * gap_closed(rows, s):+.0f}%" for s in SOURCES)
        lines.append(f"log-perplexity gap SparseGPT->dense closed by Sparse Expansion: {closed}")
        if rows[2].get("clusters"):
            lines.append(f"Sparse Expansion clusters: {rows[2]['clusters']}")
    lines.append(
        "FFN MB: dense fp32; SparseGPT and experts as values + 1-bit mask (K experts store K masks). "
        "MFLOP/token: FFN linears with a dense kernel (each token uses one expert) plus routing."
    )
    return "\n".join(lines)


def _write_results(directory: Path, rows: list[dict[str, Any]], config: DemoConfig) -> None:
    (directory / "results.json").write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=2))
    with (directory / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    width = 0.8 / len(SOURCES)
    for i, source in enumerate(SOURCES):
        ax_ppl.bar(
            [j + i * width for j in range(len(rows))], [r[f"ppl_{source}"] for r in rows], width, label=source
        )
    ax_ppl.set_xticks([j + width * (len(SOURCES) - 1) / 2 for j in range(len(rows))], names, fontsize=8)
    ax_ppl.set_ylabel("token perplexity (held-out)")
    ax_ppl.legend()
    ax_bytes.bar(names, [r["ffn_bytes"] / 2**20 for r in rows], color="tab:gray")
    ax_bytes.set_ylabel("FFN storage (MB)")
    ax_bytes.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"{Path(config.model).name}: {config.sparsity:.0%} sparsity, {config.calibration_samples}x{config.seq_len} calibration tokens"
    )
    fig.tight_layout()
    fig.savefig(directory / "results.png", dpi=110)
    plt.close(fig)
