"""Argument types shared by the sub-commands: counts, sizes and percents checked at parse time.

Why: an unchecked ``--windows -3`` was read as "all but 3" (16,078 windows),
``--batch-size 0`` failed deep inside with "range() arg 3 must not be zero".
Given as ``type=`` to ``add_argument``, these make argparse refuse the value
at once with ``argument --windows: must be a positive integer, got -3`` (it
prefixes the flag) and exit code 2, before anything is loaded.

Light on purpose: no torch, no transformers (``--help`` imports this module).
"""

from __future__ import annotations

import argparse
import math


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count or size of at least 1 (windows, samples, batch size, pairs, neurons, experts)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def sequence_length(text: str) -> int:
    """Tokens per window: at least 2 (one context token and one predicted token)."""
    value = _integer(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (tokens per window), got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """A seed or an index that cannot be negative."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def percent(text: str) -> float:
    """A percent in (0, 100] (share of neurons, as in the paper's 0.5%, 1%, 2%, 5%)."""
    value = _number(text)
    if not 0.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be a percent in (0, 100], got {text}")
    return value


def sparsity(text: str) -> float:
    """A sparsity in [0, 1) (0.5 prunes half of the weights)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a sparsity in [0, 1) (0.5 prunes half), got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A threshold that cannot be negative (a Wasserstein distance)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
