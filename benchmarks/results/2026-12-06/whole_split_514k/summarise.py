"""Print the whole-split table (summary_whole_split_1004x512.txt) from the two seeds' raw JSON.

Seed 1 ran only dense and K = 16: the whole split is the same text for every seed, so its gap is
taken against seed 0's SparseGPT row (SparseGPT's Hessian would sum the same tokens in another
order; that row was not rerun). ``quality_summary.py`` wants each seed's own SparseGPT row, hence
this small script. Run from the repository root.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def rows(seed: int) -> dict[str, dict[str, Any]]:
    results = json.loads((HERE / f"u50_1004x512_seed{seed}.json").read_text())["results"]
    return {row["variant"]: row for row in results}


def main() -> None:
    seed0, seed1 = rows(0), rows(1)
    dense, sparsegpt = seed0["dense"]["ppl_by_text"], seed0["sparsegpt"]["ppl_by_text"]
    if seed1["dense"]["ppl_by_text"] != dense:
        raise SystemExit("the seeds' dense rows differ: not the same evaluation")
    columns = list(dense)
    print(
        "Whole bundled calibration split, 1004 windows x 512 tokens = 514,048 tokens (every seed the same text)."
    )
    print(
        "Gap closed in log perplexity against seed 0's SparseGPT 50% row (seed 1 did not rerun SparseGPT).\n"
    )
    print("| row | " + " | ".join(columns) + " | mean gap | compress s |")
    print("|---|" + "---|" * (len(columns) + 2))
    print("| dense | " + " | ".join(f"{dense[c]:.3f}" for c in columns) + " | | |")
    seconds = seed0["sparsegpt"]["compress_s"]
    print(
        "| SparseGPT 50% (seed 0) | "
        + " | ".join(f"{sparsegpt[c]:.3f}" for c in columns)
        + f" | | {seconds:.0f} |"
    )
    for name, by in (("K = 16, seed 0", seed0), ("K = 16, seed 1", seed1)):
        ppl = by["se:16"]["ppl_by_text"]
        gaps = [
            100 * (math.log(sparsegpt[c]) - math.log(ppl[c])) / (math.log(sparsegpt[c]) - math.log(dense[c]))
            for c in columns
        ]
        cells = " | ".join(f"{ppl[c]:.3f} ({gap:+.1f}%)" for c, gap in zip(columns, gaps, strict=True))
        print(f"| {name} | {cells} | {sum(gaps) / len(gaps):+.1f}% | {by['se:16']['compress_s']:.0f} |")


if __name__ == "__main__":
    main()
