"""``sparse-expansion eval MODEL_OR_DIR``: token perplexity over fixed windows, per text source.

The short path to the number papers quote, with no lm-eval in the way:
``token_windows`` of the bundled evaluation text scored by ``token_perplexity``.
The lm-eval task ``sparse_expansion_token_perplexity`` scores the same windows
and gives the same number (tested to 1e-4 relative).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from sparse_expansion_plugin.commands.arguments import positive_int, sequence_length

if TYPE_CHECKING:  # torch is imported when the command runs, not for --help
    import torch

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes


class PerplexityRow(TypedDict):
    """One row of :func:`perplexity_table` (and of ``--json``'s ``rows``)."""

    source: str
    windows: int
    predicted_tokens: int
    token_perplexity: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_OR_DIR", help="smollm2-135m (embedded default), a saved dir, or a hub name"
    )
    parser.add_argument(
        "--windows", type=positive_int, default=None, help="number of windows (default: every full window)"
    )
    parser.add_argument(
        "--seq-len", type=sequence_length, default=512, help="tokens per window (default 512)"
    )
    parser.add_argument(
        "--sources",
        default="python_docs,jargon_file",
        help="comma-separated text sources (default: both bundled ones)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results to this JSON file"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def load_for_eval(name_or_dir: str | Path, dtype: torch.dtype, device: str):
    """(model, tokenizer) of a dense, pruned or expanded model, ready for ``token_perplexity``."""
    from sparse_expansion_plugin.data.locations import checked_model_location
    from sparse_expansion_plugin.data.models import load_model_and_tokenizer
    from sparse_expansion_plugin.sparse_expansion.model import is_expanded_dir, load_expanded

    path = checked_model_location(name_or_dir)
    if not (isinstance(path, Path) and is_expanded_dir(path)):
        return load_model_and_tokenizer(path, dtype=dtype, device=device)
    from transformers import AutoTokenizer

    model = load_expanded(path, device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def window_sources(tokenizer, windows: torch.Tensor, sources: tuple[str, ...]) -> list[str]:
    """Which source each row of ``windows [n, L]`` was cut from (rows are matched, not recomputed by index)."""
    from sparse_expansion_plugin.data.text import token_windows

    owner: dict[tuple[int, ...], str] = {}
    for source in sources:
        for row in token_windows(tokenizer, "evaluation", windows.shape[1], None, (source,)).tolist():
            owner.setdefault(tuple(row), source)
    return [owner[tuple(row)] for row in windows.tolist()]


def perplexity_table(
    model, tokenizer, seq_len: int, num_windows: int | None, sources: tuple[str, ...], batch_size: int
) -> list[PerplexityRow]:
    """Rows ``{source, windows, predicted_tokens, token_perplexity}`` per source, then ``all``."""
    import torch

    from sparse_expansion_plugin.data.text import token_windows
    from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

    windows = token_windows(tokenizer, "evaluation", seq_len, num_windows, sources)
    labels = window_sources(tokenizer, windows, sources) if len(sources) > 1 else [sources[0]] * len(windows)
    rows: list[PerplexityRow] = []
    for source in sources:
        mask = torch.tensor([label == source for label in labels])
        if mask.any():
            ppl = token_perplexity(model, windows[mask], batch_size)
            rows.append(
                {
                    "source": source,
                    "windows": int(mask.sum()),
                    "predicted_tokens": int(mask.sum()) * (seq_len - 1),
                    "token_perplexity": ppl,
                }
            )
    total = sum(r["predicted_tokens"] for r in rows)
    # exp of the token-weighted mean log-perplexity == token_perplexity over all windows at once.
    overall = math.exp(sum(r["predicted_tokens"] * math.log(r["token_perplexity"]) for r in rows) / total)
    rows.append(
        {"source": "all", "windows": len(windows), "predicted_tokens": total, "token_perplexity": overall}
    )
    return rows


def format_table(rows: list[PerplexityRow]) -> str:
    lines = [f"{'source':<14}{'windows':>9}{'tokens':>10}{'token_ppl':>12}"]
    lines += [
        f"{r['source']:<14}{r['windows']:>9}{r['predicted_tokens']:>10}{r['token_perplexity']:>12.4f}"
        for r in rows
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparse_expansion_plugin.data.locations import checked_model_location
    from sparse_expansion_plugin.data.text import HUB_DATASETS, SOURCES
    from sparse_expansion_plugin.evaluation.task_docs import parse_sources
    from sparse_expansion_plugin.outputs import atomic_write_text, check_output_file

    if args.json is not None:
        check_output_file(args.json, args.overwrite)
    sources = parse_sources(args.sources)
    unknown = [s for s in sources if s not in SOURCES and s not in HUB_DATASETS]
    if unknown:
        raise ValueError(
            f"unknown text source(s) {unknown}; choose from {', '.join(SOURCES + tuple(HUB_DATASETS))}"
        )
    location = checked_model_location(args.model, args.seq_len)
    start = time.perf_counter()
    model, tokenizer = load_for_eval(location, getattr(torch, args.dtype), args.device)
    logger.info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    start = time.perf_counter()
    rows = perplexity_table(model, tokenizer, args.seq_len, args.windows, sources, args.batch_size)
    seconds = time.perf_counter() - start
    print(f"token perplexity of {args.model} over {args.seq_len}-token windows of the evaluation text")
    print(format_table(rows))
    logger.info(
        "scored %d tokens in %.1f s (%.0f tokens/s)",
        rows[-1]["predicted_tokens"],
        seconds,
        rows[-1]["predicted_tokens"] / seconds,
    )
    if args.json is not None:
        payload = {
            "model": args.model,
            "seq_len": args.seq_len,
            "sources": list(sources),
            "seconds": seconds,
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2))
        logger.info("wrote %s", args.json)
    return 0
