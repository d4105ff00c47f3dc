"""Mean and spread over seeds of ``sparse_expansion_quality.py`` outputs: one markdown table.

Each JSON file is one seed's run (same arguments but ``--seed``). For every
variant and every evaluation text it prints the perplexity (mean, and the
min..max over seeds) and the gap closed: the share of the log-perplexity gap
between the seed's own SparseGPT row (``sparsegpt``, or ``sparsegpt-2:4`` for a
2:4 variant) and its dense row that the variant closes, averaged over seeds,
with the standard deviation. Why per seed: a seed changes the calibration text,
so each seed's rows are compared with that seed's baseline.

    python benchmarks/quality_summary.py benchmarks/results/2026-11-30/sweep/u50_64x512_seed*.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

BASELINES = ("dense", "sparsegpt", "sparsegpt-2:4")


def gap_closed(
    row: dict[str, float], dense: dict[str, float], reference: dict[str, float], text: str
) -> float:
    """Share of ``log ppl(reference) - log ppl(dense)`` that ``row`` removes on ``text``."""
    gap = math.log(reference[text]) - math.log(dense[text])
    return (math.log(reference[text]) - math.log(row[text])) / gap


def reference_name(variant: str) -> str:
    """The SparseGPT row a variant is compared with: 2:4 against 2:4."""
    return "sparsegpt-2:4" if "2:4" in variant else "sparsegpt"


def summarise(runs: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    """``(variants in first-seen order, texts, {variant: {text: (ppls, gaps), "seconds": [...]}})``."""
    variants: list[str] = []
    texts: list[str] = []
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        rows = {r["variant"]: r for r in run["results"] if "ppl_by_text" in r}
        for name, row in rows.items():
            if name not in table:
                variants.append(name)
                table[name] = {"seconds": []}
            for text, value in row["ppl_by_text"].items():
                if text not in texts:
                    texts.append(text)
                ppls, gaps = table[name].setdefault(text, ([], []))
                ppls.append(value)
                reference = rows.get(reference_name(name))
                if name not in BASELINES and reference and "dense" in rows:
                    gaps.append(
                        gap_closed(
                            row["ppl_by_text"], rows["dense"]["ppl_by_text"], reference["ppl_by_text"], text
                        )
                    )
            if row.get("compress_s"):
                table[name]["seconds"].append(row["compress_s"])
    return variants, texts, table


def spread(values: list[float], percent: bool = False) -> str:
    """``mean ± std (n)`` or the single value."""
    fmt = (lambda v: f"{v:+.0%}") if percent else (lambda v: f"{v:.2f}")
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    deviation = statistics.stdev(values)
    return (
        f"{fmt(statistics.mean(values))} ± {deviation:.0%}"
        if percent
        else (f"{fmt(statistics.mean(values))} ± {deviation:.2f}")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="sparse_expansion_quality.py --output files")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    seeds = [run["args"].get("seed", "?") for run in runs]
    variants, texts, table = summarise(runs)
    first = runs[0]["args"]
    print(
        f"{len(runs)} seeds ({', '.join(seeds)}); calibration {first['calibration_samples']}x{first['seq_len']} "
        f"tokens, sparsity {first['sparsity']}; perplexity mean ± std over seeds; gap closed against each "
        "seed's own dense and SparseGPT rows\n"
    )
    print("| variant | " + " | ".join(f"ppl {t} | gap closed {t}" for t in texts) + " | compress s | seeds |")
    print("|---|" + "---|---|" * len(texts) + "---|---|")
    for name in variants:
        cells = []
        for text in texts:
            ppls, gaps = table[name].get(text, ([], []))
            cells.append(f"{spread(ppls)} | {spread(gaps, percent=True)}")
        seconds = table[name]["seconds"]
        shown = f"{statistics.mean(seconds):.0f}" if seconds else ""
        count = len(table[name][texts[0]][0]) if texts[0] in table[name] else 0
        print(f"| {name} | {' | '.join(cells)} | {shown} | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
