"""Calibration data in the form llm-compressor's ``oneshot()`` takes."""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from sparse_expansion_plugin.data.text import SOURCES, token_windows


def calibration_dataset(
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int = 32,
    seq_len: int = 512,
    sources: str | tuple[str, ...] | list[str] = SOURCES,
) -> Dataset:
    """Pre-tokenised windows of the calibration split as a ``datasets.Dataset``.

    ``oneshot(dataset=..., num_calibration_samples=num_samples,
    max_seq_length=seq_len)`` consumes it unchanged (it still needs the tokenizer
    passed as ``processor``).
    """
    windows = token_windows(tokenizer, "calibration", seq_len, num_samples, sources)
    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in ids]})
