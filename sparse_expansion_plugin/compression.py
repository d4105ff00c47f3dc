"""Run llm-compressor's ``oneshot`` on the package's calibration text: the one way to compress.

Why one function: the CLI, the demo and the benchmarks must calibrate alike
(same windows, same seeding, same ``oneshot`` arguments), or their figures
cannot be compared; and the one subtle step, seeding the global RNG that
``oneshot`` shuffles the calibration samples with, is then written once.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparse_expansion_plugin.data.calibration import calibration_dataset
from sparse_expansion_plugin.data.text import SOURCES


def run_oneshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Any,
    num_samples: int,
    seq_len: int,
    seed: int | None = 0,
    sources: str | tuple[str, ...] | list[str] = SOURCES,
    dataset: Dataset | None = None,
) -> float:
    """Compress ``model`` in place with ``oneshot`` on calibration windows; return its wall time in seconds.

    ``oneshot`` modifies the model, so load a fresh copy for every run
    (``load_model_and_tokenizer``) and pass its tokenizer.

    ``recipe`` is anything ``oneshot(recipe=...)`` takes: a list of modifier
    instances, a ``Recipe`` or a YAML path. The calibration data are
    ``num_samples`` windows of ``seq_len`` tokens of ``sources`` (calibration
    split, disjoint from the evaluation text); pass ``dataset`` (from
    :func:`calibration_dataset` with the same sizes) to tokenise them once for
    several runs. ``oneshot`` shuffles the samples with torch's global RNG, so
    it is seeded with ``seed`` just before; ``seed=None`` leaves the RNG as
    the caller left it. The time covers ``oneshot`` only, not building the data.
    """
    from llmcompressor import oneshot

    if dataset is None:
        dataset = calibration_dataset(tokenizer, num_samples, seq_len, sources)
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    oneshot(
        model=model,
        # Needed whenever a dataset is passed, even a tokenised one. oneshot's annotation says
        # ProcessorMixin, but a tokenizer is what it takes for a text model.
        processor=tokenizer,  # type: ignore[arg-type]
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
    )
    return time.perf_counter() - start


def release_weights(model: torch.nn.Module) -> None:
    """Free a model's weights in place, after ``oneshot`` compressed it and it has been used.

    ``del model`` does not free it: llm-compressor's sequential pipeline compiles an autowrapped
    forward whose namespace holds the model and registers it through ``torch.fx.wrap``, whose
    module-level registry lives as long as the process (llm-compressor 0.14, torch 2.13). So every
    model compressed in one process (the demo's SparseGPT and Sparse Expansion, the benchmarks'
    variants) would stay in memory until the process ends; two SmolLM2 models with 64 experts each ran
    a 23 GiB machine out of memory. Moving the module to the meta device drops its parameters and
    buffers, whoever still holds the module. ``oneshot`` leaves compressed-tensors' offload caches on
    the modules it dispatched, which would copy the meta tensors back into the cache, so they go first.
    The model is unusable afterwards.
    """
    from compressed_tensors.offload.dispatch import remove_dispatch

    remove_dispatch(model).to("meta")
