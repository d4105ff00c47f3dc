"""lm-eval model ``sparse-expansion``: ``HFLM`` that also loads our expanded directories.

Only ``_create_model`` changes (lm-eval's documented extension point): an
expanded directory (config.json with a ``sparse_expansion`` block) is loaded
by our own loader, no remote code; any other directory or hub name (dense,
SparseGPT-pruned: a dense checkpoint with zeros) goes through ``HFLM``
unchanged, so every usual ``--model_args`` keeps working. Around that:

- ``pretrained=smollm2-135m`` (or ``default``) means the embedded model;
- a missing directory or one without weights fails early with a clear error;
- under ``accelerate launch`` on CPU (or with fewer GPUs than processes),
  ``HFLM`` runs every process on all documents; we shard them by process as
  it does on GPUs, so ``accelerate launch --cpu`` is data-parallel too.

Importing this module registers the model (after ``lm_eval.models``, whose
import registers the built-in models: registering first would hide them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-in models first; see module docstring)
import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from sparse_expansion_plugin.data.models import resolve_model_path
from sparse_expansion_plugin.evaluation.lm_eval_compat import keep_whitespace_only_context
from sparse_expansion_plugin.evaluation.lm_eval_registry import MODEL_NAME

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _looks_local(name: str) -> bool:
    """A path rather than a hub name: absolute, relative, home-based, or with more than one ``/``."""
    return name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1)


def check_model_dir(pretrained: str) -> None:
    """Fail early, naming the fix, when ``pretrained`` is a directory lm-eval cannot load.

    Hub names (``org/name`` that is not a local path) pass through untouched.
    """
    path = Path(pretrained).expanduser()
    if not path.exists():
        if _looks_local(pretrained):
            raise FileNotFoundError(
                f"model directory {pretrained!r} does not exist; give the directory of a saved model, "
                "a hub name, or smollm2-135m for the embedded default"
            )
        return
    if not path.is_dir():
        raise NotADirectoryError(
            f"pretrained={pretrained!r} is a file; pass the directory that holds config.json"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{pretrained!r} has no config.json: it is not a saved Hugging Face model directory"
        )
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"{pretrained!r} holds no weights (no *.safetensors or *.bin); save the model with "
            "save_pretrained (or `sparse-expansion compress`) into it first"
        )


def _config_dict(pretrained: str) -> dict:
    config = Path(pretrained).expanduser() / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def is_expanded(pretrained: str) -> bool:
    """True for a saved Sparse Expansion directory (uses ``modeling.save_load.is_expanded_dir`` when present)."""
    if not Path(pretrained).expanduser().is_dir():
        return False
    try:
        from sparse_expansion_plugin.sparse_expansion.model import is_expanded_dir
    except ImportError:
        return "sparse_expansion" in _config_dict(pretrained)
    return bool(is_expanded_dir(pretrained))


def expanded_loader():
    try:
        from sparse_expansion_plugin.sparse_expansion.model import load_expanded
    except ImportError as error:
        raise ImportError(
            "this directory holds an expanded model but sparse_expansion_plugin.sparse_expansion.model."
            "load_expanded is not available in this install; update sparse-expansion-plugin"
        ) from error
    return load_expanded


class SparseExpansionLM(HFLM):
    """``HFLM`` whose ``pretrained=DIR`` may also be a Sparse Expansion directory."""

    def __init__(self, pretrained: Any = "smollm2-135m", **kwargs: Any) -> None:
        if isinstance(pretrained, str | os.PathLike):
            pretrained = resolve_model_path(str(pretrained))
            check_model_dir(pretrained)
        device = kwargs.get("device", "cuda")
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            # HFLM's default is "cuda"; on a machine without one that would fail while loading.
            logger.warning("device %r requested but CUDA is not available: using cpu", device)
            kwargs["device"] = "cpu"
        if isinstance(kwargs.get("tokenizer"), str | os.PathLike):
            kwargs["tokenizer"] = resolve_model_path(str(kwargs["tokenizer"]))
        super().__init__(pretrained=pretrained, **kwargs)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            # HFLM shards documents over processes only when it counts more than one GPU.
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            self._device = accelerator.device
            logger.info("data parallel: process %d of %d on %s", self._rank, self._world_size, self._device)

    def _create_model(
        self,
        pretrained: str,
        revision: str | None = "main",
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool | None = False,
        parallelize: bool | None = False,
        gpus: int | None = None,
        max_memory_per_gpu: int | str | None = None,
        max_cpu_memory: int | str | None = None,
        offload_folder: str | None = "./offload",
        peft: str | None = None,
        delta: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not is_expanded(pretrained):
            super()._create_model(
                pretrained,
                revision=revision,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                parallelize=parallelize,
                gpus=gpus,
                max_memory_per_gpu=max_memory_per_gpu,
                max_cpu_memory=max_cpu_memory,
                offload_folder=offload_folder,
                peft=peft,
                delta=delta,
                **kwargs,
            )
            return
        if peft or delta or kwargs.get("autogptq") or kwargs.get("gptqmodel") or kwargs.get("tp_plan"):
            raise ValueError(
                "peft, delta, autogptq, gptqmodel and tp_plan are not supported for expanded models"
            )
        torch_dtype = get_dtype(dtype)
        model = expanded_loader()(
            pretrained, device="cpu", dtype=None if torch_dtype == "auto" else torch_dtype
        )
        placement = self._get_accelerate_args(
            parallelize=parallelize,
            device_map=kwargs.get("device_map"),
            max_memory_per_gpu=max_memory_per_gpu,
            max_cpu_memory=max_cpu_memory,
            offload_folder=offload_folder,
            gpus=gpus,
        )
        self._model = place_model(model, placement)
        logger.info("loaded expanded model from %s (%s)", pretrained, placement.get("device_map"))


def place_model(model: torch.nn.Module, placement: dict) -> torch.nn.Module:
    """Put an in-memory model where ``HFLM._get_accelerate_args`` says: one device or an accelerate device map."""
    device_map = placement.get("device_map")
    if device_map is None:
        return model
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return model.to(device_map[""])
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto" or isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model,
            max_memory=placement.get("max_memory"),
            no_split_module_classes=getattr(model, "_no_split_modules", None) or [],
        )
    if device_map.get("") == "disk":
        raise ValueError(
            f"the memory limits {placement.get('max_memory')} leave no room for any layer of the model: "
            "raise max_memory_per_gpu / max_cpu_memory"
        )
    keys = list(model.state_dict())
    for name, device in list(device_map.items()):
        # accelerate writes no offload index for a module with nothing saved (rotary inv_freq is a
        # non-persistent buffer) and then fails to read it: keep such modules on the CPU.
        if device == "disk" and name and not any(k.startswith(f"{name}.") for k in keys):
            device_map[name] = "cpu"
    return dispatch_model(
        model, device_map=device_map, offload_dir=placement.get("offload_folder"), offload_buffers=True
    )


def register() -> None:
    """Register ``sparse-expansion`` in lm-eval's model registry (idempotent; replaces the lazy placeholder)."""
    keep_whitespace_only_context()
    model_registry.register(MODEL_NAME, target=SparseExpansionLM)


register()
