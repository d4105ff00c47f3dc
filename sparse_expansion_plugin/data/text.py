"""Calibration and evaluation text, offline first, as fixed token windows.

The bundled text (see ``data/text/LICENSES.md``) has two kinds, Python
documentation and the Jargon File, each split by document into disjoint
``calibration`` and ``evaluation`` parts. Hub dataset names (``wikitext2``,
``c4``) go through ``datasets`` and need a network.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import torch
from transformers import PreTrainedTokenizerBase

SOURCES = ("python_docs", "jargon_file")
SPLITS = ("calibration", "evaluation")
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}, "text"),
    "c4": ("allenai/c4", "en", {"calibration": "train", "evaluation": "validation"}, "text"),
}


@lru_cache(maxsize=16)
def bundled_text(source: str, split: str) -> str:
    """The bundled text of one source (``python_docs``/``jargon_file``) and split."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose from {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    blob = (
        resources.files("sparse_expansion_plugin.data").joinpath(f"text/{source}.{split}.txt.gz").read_bytes()
    )
    return gzip.decompress(blob).decode("utf-8")


def hub_text(name: str, split: str) -> str:  # pragma: no cover - needs network
    """Text of a hub dataset (``wikitext2``, ``c4``) joined by blank lines, as the papers do."""
    import datasets

    path, config, split_map, field = HUB_DATASETS[name]
    if name == "c4":
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        }
        ds = datasets.load_dataset(
            path, data_files={split_map[split]: files[split_map[split]]}, split=split_map[split]
        )
    else:
        ds = datasets.load_dataset(path, config, split=split_map[split])
    return "\n\n".join(ds[field])


def text_for(split: str, sources: str | tuple[str, ...] | list[str] = SOURCES) -> list[str]:
    """Texts for a split, one per source, from the bundle or (by name) from the hub."""
    if isinstance(sources, str):
        sources = tuple(s.strip() for s in sources.split(","))
    texts = []
    for source in sources:
        if source in HUB_DATASETS:
            texts.append(hub_text(source, split))
        elif source in SOURCES:
            texts.append(bundled_text(source, split))
        else:
            known = ", ".join(SOURCES + tuple(HUB_DATASETS))
            raise ValueError(f"unknown text source {source!r}; choose from {known}")
    return texts


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "evaluation",
    seq_len: int = 512,
    num_windows: int | None = None,
    sources: str | tuple[str, ...] | list[str] = SOURCES,
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens: ``[num_windows, seq_len]`` int64.

    Each source is tokenised as one stream and cut into consecutive windows;
    the windows of the sources are interleaved (a, b, a, b, ...) so that any
    prefix of the result mixes the kinds of text. ``num_windows=None`` takes
    every full window.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    per_source = []
    for text in text_for(split, sources):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n = ids.numel() // seq_len
        per_source.append(ids[: n * seq_len].view(n, seq_len))
    rows: list[torch.Tensor] = []
    for i in range(max(len(w) for w in per_source)):
        rows.extend(w[i] for w in per_source if i < len(w))
    windows = torch.stack(rows)
    if num_windows is not None:
        if num_windows > len(windows):
            raise ValueError(
                f"asked for {num_windows} windows of {seq_len} tokens but the {split} text of "
                f"{sources} holds only {len(windows)}"
            )
        windows = windows[:num_windows]
    return windows
