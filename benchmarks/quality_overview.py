"""Sparse Expansion's measured gap closed at a glance: one table from the committed raw outputs.

The sweep's results are spread over many runs (each new row was run with ``--resume`` on a copy of
the rows it is compared with, one job at a time), so the README's detailed tables are per run. This
script reads those raw JSON files through an explicit manifest below and prints, for every variant
and calibration size, the gap closed averaged over seeds and the four evaluation columns (two texts,
scored at 512 and 2,048 tokens per window), with the lowest and highest single seed and column. Each
gap is taken inside its own file, against that file's dense row and its SparseGPT row (SparseGPT 2:4
for a 2:4 variant), as ``quality_summary.py`` does. Why a manifest and not a glob: some files hold
rows of an older default (``prior_tokens: 1024`` before 2026-12-01) under the same variant name, so
which file stands for which cell is a choice, written down here once.

    python benchmarks/quality_overview.py            # markdown table
    python benchmarks/quality_overview.py --per-seed # one line per seed and cell as well
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from quality_summary import gap_closed, reference_name

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {"32k": 64, "131k": 256, "262k": 512, "514k": 1004}
"""Column label -> ``--calibration-samples`` (windows of 512 tokens). 514k is the whole bundled
calibration split: every seed calibrates on the same 1,004 windows there, so its seeds differ only in
k-means and sample order. It was run for K = 16 and K = 64 (3 seeds each) and K = 64 under 2:4
(seed 0 only)."""


@dataclass(frozen=True)
class Source:
    """One seed's row: a raw output file (relative to ``benchmarks/results``) and the row's variant."""

    path: str
    variant: str


def seeds(pattern: str, variant: str) -> list[Source]:
    """Seeds 0, 1 and 2 of ``pattern`` (``{s}`` stands for the seed)."""
    return [Source(pattern.format(s=s), variant) for s in (0, 1, 2)]


# (label, size) -> sources. Labels are what the README's tables call the rows.
MANIFEST: dict[tuple[str, str], list[Source]] = {
    # 50% unstructured
    ("Wanda 50%", "32k"): seeds("2026-11-30/sweep/u50_64x512_seed{s}.json", "wanda"),
    ("Wanda 50%", "131k"): seeds("2026-12-05/controls_131k/ctl_256x512_seed{s}.json", "wanda"),
    ("Wanda 50%", "262k"): seeds("2026-12-05/controls_262k/wk1_512x512_seed{s}.json", "wanda"),
    ("K = 1", "32k"): [Source("2026-11-30/sweep/u50_64x512_seed0.json", "se:1")]
    + seeds("2026-12-01/sweep/k1_64x512_seed{s}.json", "se:1")[1:],
    ("K = 1", "131k"): seeds("2026-12-05/controls_131k/k1_256x512_seed{s}.json", "se:1"),
    ("K = 1", "262k"): seeds("2026-12-05/controls_262k/wk1_512x512_seed{s}.json", "se:1"),
    ("K = 4", "32k"): seeds("2026-12-01/sweep/prior64_k4_64x512_seed{s}.json", "se:4"),
    ("K = 4", "131k"): seeds("2026-12-05/k4_131k/k4_256x512_seed{s}.json", "se:4"),
    ("K = 4", "262k"): seeds("2026-12-05/k4_262k/k4_512x512_seed{s}.json", "se:4"),
    ("K = 16 (default)", "32k"): seeds(
        "2026-12-01/sweep/levers_64x512_seed{s}.json", "se:16+prior_tokens=64"
    ),
    ("K = 16 (default)", "131k"): seeds("2026-12-01/sweep/prior64_256x512_seed{s}.json", "se:16"),
    ("K = 16 (default)", "262k"): seeds("2026-12-01/sweep/prior64_512x512_seed{s}.json", "se:16"),
    ("K = 16 (default)", "514k"): seeds("2026-12-06/whole_split_514k/u50_1004x512_seed{s}.json", "se:16"),
    ("K = 64", "32k"): seeds("2026-12-06/k64_32k/k64_64x512_seed{s}.json", "se:64"),
    ("K = 64", "131k"): seeds("2026-12-03/k64/k64_256x512_seed{s}.json", "se:64")[:2]
    + [Source("2026-12-05/k64_131k/k64_256x512_seed2.json", "se:64")],
    ("K = 64", "262k"): seeds("2026-12-05/k64_262k/k64_512x512_seed{s}.json", "se:64"),
    ("K = 64", "514k"): seeds("2026-12-06/k64_whole_split_514k/k64_1004x512_seed{s}.json", "se:64"),
    ("control: K = 16 experts, random routing", "32k"): seeds(
        "2026-12-01/sweep/prior64_random_64x512_seed{s}.json", "random:16"
    ),
    ("control: K = 16 experts, random routing", "131k"): seeds(
        "2026-12-05/controls_131k/ctl_256x512_seed{s}.json", "random:16"
    ),
    ("control: K = 16 experts, random routing", "262k"): seeds(
        "2026-12-05/random_262k/random_512x512_seed{s}.json", "random:16"
    ),
    # 2:4, against SparseGPT 2:4
    ("Wanda 2:4", "32k"): [Source("2026-11-30/sweep/u50_64x512_seed0.json", "wanda-2:4")]
    + seeds("2026-12-01/sweep/wanda2of4_64x512_seed{s}.json", "wanda-2:4")[1:],
    ("Wanda 2:4", "131k"): seeds("2026-12-05/wanda_2of4_131k/wanda2of4_256x512_seed{s}.json", "wanda-2:4"),
    ("Wanda 2:4", "262k"): seeds("2026-12-06/wanda_2of4_262k/wanda2of4_512x512_seed{s}.json", "wanda-2:4"),
    ("K = 1, 2:4", "32k"): seeds("2026-12-06/k_order_2of4_32k/k124_2of4_64x512_seed{s}.json", "se:1:2:4"),
    ("K = 1, 2:4", "131k"): seeds("2026-12-06/k_order_2of4_131k/k1_2of4_256x512_seed{s}.json", "se:1:2:4"),
    ("K = 1, 2:4", "262k"): seeds("2026-12-06/k_order_2of4_262k/k14_2of4_512x512_seed{s}.json", "se:1:2:4"),
    ("K = 4, 2:4", "32k"): seeds("2026-12-06/k_order_2of4_32k/k124_2of4_64x512_seed{s}.json", "se:4:2:4"),
    ("K = 4, 2:4", "131k"): seeds("2026-12-06/k_order_2of4_131k/k4_2of4_256x512_seed{s}.json", "se:4:2:4"),
    ("K = 4, 2:4", "262k"): seeds("2026-12-06/k_order_2of4_262k/k14_2of4_512x512_seed{s}.json", "se:4:2:4"),
    ("K = 16, 2:4", "32k"): seeds("2026-12-01/sweep/prior64_2of4_64x512_seed{s}.json", "se:16:2:4"),
    ("K = 16, 2:4", "131k"): seeds("2026-12-05/two_four_131k/u24_256x512_seed{s}.json", "se:16:2:4"),
    ("K = 16, 2:4", "262k"): seeds("2026-12-05/two_four_262k/u24_512x512_seed{s}.json", "se:16:2:4"),
    ("K = 64, 2:4", "32k"): seeds("2026-12-06/k64_32k/k64_64x512_seed{s}.json", "se:64:2:4"),
    ("K = 64, 2:4", "131k"): seeds("2026-12-06/k64_2of4_131k/k64_2of4_256x512_seed{s}.json", "se:64:2:4"),
    ("K = 64, 2:4", "262k"): seeds("2026-12-06/k64_2of4_262k/k64_2of4_512x512_seed{s}.json", "se:64:2:4"),
    ("K = 64, 2:4", "514k"): seeds(  # each seed's two 2:4 rows take about 2.5 h: one seed a session
        "2026-12-07/k64_2of4_whole_split_514k/k64_2of4_1004x512_seed{s}.json", "se:64:2:4"
    ),
}


TEXTS = {"python_docs": "Python docs", "jargon_file": "Jargon File"}
"""Evaluation text key (before ``@length``) -> name in the tables."""


def seed_gaps(source: Source, calibration_samples: int) -> tuple[str, dict[str, float]] | None:
    """``(seed, {evaluation column: gap closed})`` of one row, or None while its file lacks the row.

    Checks that the file was run with the setup every cell shares, so a wrong manifest entry fails
    loudly instead of mixing settings.
    """
    path = RESULTS / source.path
    if not path.exists():  # a run still under way
        return None
    run = json.loads(path.read_text())
    args = run["args"]
    expected = {
        "calibration_samples": str(calibration_samples),
        "seq_len": "512",
        "eval_tokens": "8192",
        "eval_seq_lens": "[512, 2048]",
        "sparsity": "0.5",
    }
    wrong = {key: args.get(key) for key, value in expected.items() if str(args.get(key)) != value}
    if wrong:
        raise SystemExit(f"{source.path}: expected {expected}, found {wrong}; fix the manifest entry")
    rows = {r["variant"]: r["ppl_by_text"] for r in run["results"] if "ppl_by_text" in r}
    if source.variant not in rows:
        return None
    dense, reference = rows["dense"], rows[reference_name(source.variant)]
    return str(args["seed"]), {
        column: gap_closed(rows[source.variant], dense, reference, column) for column in dense
    }


def percent(value: float) -> str:
    """``+41%`` / ``−57%`` (a true minus sign), and ``0%`` for what rounds to zero either side."""
    shown = f"{value:+.0%}"
    return "0%" if shown in ("+0%", "-0%") else shown.replace("-", "−")


def spread(gaps: list[float]) -> str:
    """``mean% (lowest to highest)``."""
    return f"{percent(statistics.mean(gaps))} ({percent(min(gaps))} to {percent(max(gaps))})"


def measured_cells(label: str) -> list[list[tuple[str, dict[str, float]]]]:
    """Per calibration size, the ``(seed, gaps)`` measured for ``label`` (empty where not run)."""
    return [
        [g for source in MANIFEST.get((label, size), []) if (g := seed_gaps(source, samples))]
        for size, samples in SIZES.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-seed", action="store_true", help="also print every seed's four columns")
    args = parser.parse_args(argv)
    labels = list(dict.fromkeys(label for label, _ in MANIFEST))
    cells = {label: measured_cells(label) for label in labels}
    header = (
        "| variant | " + " | ".join(f"{size} tokens" for size in SIZES) + " |\n|---|" + "---|" * len(SIZES)
    )
    print(
        "Gap closed in log perplexity, mean over seeds and the four evaluation columns (lowest to highest "
        "single seed and column), and number of seeds; 50% rows against SparseGPT 50%, 2:4 rows against "
        "SparseGPT 2:4\n"
    )
    print(header)
    for label in labels:
        shown = [
            f"{spread([g for _, gaps in m for g in gaps.values()])}, {len(m)} seed{'s' if len(m) > 1 else ''}"
            if m
            else "not run"
            for m in cells[label]
        ]
        print(f"| {label} | " + " | ".join(shown) + " |")
    print(
        "\nThe same per text (the issue's goal is per text): mean over seeds and both window lengths "
        "(lowest to highest single seed and length)\n"
    )
    print(header)
    for label in labels:
        shown = [
            "; ".join(
                f"{name} {spread([g for _, gaps in m for c, g in gaps.items() if c.split('@')[0] == key])}"
                for key, name in TEXTS.items()
            )
            if m
            else "not run"
            for m in cells[label]
        ]
        print(f"| {label} | " + " | ".join(shown) + " |")
    if args.per_seed:
        print("\nPer seed (Python docs @512 / Jargon File @512 / Python docs @2048 / Jargon File @2048):")
        for label in labels:
            for size, m in zip(SIZES, cells[label], strict=True):
                for seed, gaps in m:
                    print(f"{label} @ {size} seed {seed}: " + " / ".join(f"{g:+.1%}" for g in gaps.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
