"""Forward hooks on, calibration text through the model, hooks off: the one copy of that loop.

Every measurement of this package (neuron statistics, captured activations,
token pairs, pre-activations of ablated neurons, the WD-aware modifier's dense
pre-pass) attaches forward hooks to some modules, runs batches of text through
the model without gradients, and must remove the hooks afterwards even when a
hook raises. Written once here so that they cannot disagree on that contract
(removal on error, ``use_cache=False``, where the inputs go).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@contextmanager
def hooks_attached(modules_and_hooks: Iterable[tuple[nn.Module, ForwardHook]]) -> Iterator[None]:
    """Within the block, each ``(module, hook)`` pair is registered as a forward hook.

    Every hook is removed on exit, also when the block (or a hook, or a later
    registration) raises, so a failed measurement never leaves a model altered.
    """
    handles = []
    try:
        for module, hook in modules_and_hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_device(model: nn.Module) -> torch.device:
    """Where the inputs of ``model`` go: the device of its first parameter (CPU if it has none)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def run_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    desc: str,
    progress: bool = True,
    total: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Forward every batch (keyword arguments of ``model``) without gradients, showing a progress bar.

    Tensors move to ``device`` (default: ``model_device(model)``); the KV cache
    is off unless a batch says otherwise (measurements never generate). The
    bar is hidden when ``progress`` is false or there is a single batch.
    """
    target = torch.device(device) if device is not None else model_device(model)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    bar = tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress or total == 1)
    for batch in bar:
        inputs = {k: v.to(target) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs.setdefault("use_cache", False)
        model(**inputs)


def run_windows(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> None:
    """Forward token ``windows [n, L]`` in batches of ``batch_size`` windows, in order.

    Hooks that need to know which tokens they see count rows as they arrive:
    batch ``b`` holds flat token positions ``[b * batch_size * L, ...)``.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, L] token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, len(windows), batch_size)
    batches = ({"input_ids": windows[start : start + batch_size]} for start in starts)
    run_batches(model, batches, desc, progress, total=len(starts))
