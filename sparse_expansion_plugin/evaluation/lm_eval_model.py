"""lm-eval model ``sparse-expansion``: ``HFLM`` that also loads our expanded directories.

Only ``_create_model`` (lm-eval's documented extension point) and
``_get_config`` change, and only for an expanded directory (one that
``sparse_expansion.is_expanded_dir`` recognises): it is loaded by our own
loader, no remote code. Any other directory or hub name (dense,
SparseGPT-pruned: a dense checkpoint with zeros) goes through ``HFLM``
unchanged, so every usual ``--model_args`` keeps working. Around that:

- "local directory or hub name?" is decided by ``data.locations``, as
  everywhere in the package; ``pretrained=smollm2-135m`` (or ``default``)
  means the embedded model;
- the scoring forward (``_model_call``) of a causal LM asks for no KV cache,
  which HFLM's builds and never reads (same logits, less time and memory);
- a missing directory or one without weights fails early with a clear error;
- under ``accelerate launch`` on CPU (or with fewer GPUs than processes),
  ``HFLM`` runs every process on all documents; we shard them by process as
  it does on GPUs, so ``accelerate launch --cpu`` is data-parallel too.

Importing this module registers the model (after ``lm_eval.models``, whose
import registers the built-in models: registering first would hide them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import lm_eval.models  # noqa: F401  (registers the built-in models first; see module docstring)
import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from transformers import PretrainedConfig

from sparse_expansion_plugin.data.locations import check_model_dir, resolve_model_location
from sparse_expansion_plugin.evaluation.lm_eval_registry import MODEL_NAME
from sparse_expansion_plugin.sparse_expansion import is_expanded_dir, load_expanded
from sparse_expansion_plugin.sparse_expansion.remote_code.modeling_sparse_expansion import (
    SparseExpansionConfig,
)

logger = logging.getLogger(__name__)


def local_or_hub(name_or_path: str | os.PathLike[str], need_tokenizer: bool = True) -> str:
    """``pretrained`` / ``tokenizer`` as HFLM should receive it: a checked local directory or a hub name.

    The decision is ``data.locations.resolve_model_location``'s (``smollm2-135m`` is the embedded
    model); a local directory lm-eval could not load fails here, naming the fix.
    """
    location = resolve_model_location(name_or_path)
    if isinstance(location, Path):
        check_model_dir(location, need_tokenizer=need_tokenizer)
    return str(location)


def is_expanded(pretrained: str) -> bool:
    """True for a saved Sparse Expansion directory (a hub name is never one here)."""
    return Path(pretrained).is_dir() and is_expanded_dir(pretrained)


class SparseExpansionLM(HFLM):
    """``HFLM`` whose ``pretrained=DIR`` may also be a Sparse Expansion directory."""

    def __init__(self, pretrained: Any = "smollm2-135m", **kwargs: Any) -> None:
        if isinstance(kwargs.get("tokenizer"), str | os.PathLike):
            kwargs["tokenizer"] = local_or_hub(kwargs["tokenizer"])
        if isinstance(pretrained, str | os.PathLike):
            pretrained = local_or_hub(pretrained, need_tokenizer=kwargs.get("tokenizer") is None)
            if is_expanded(pretrained):
                # config.json says model_type sparse_expansion, which HFLM cannot classify; it is a causal LM.
                kwargs.setdefault("backend", "causal")
        device = kwargs.get("device", "cuda")
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            # HFLM's default is "cuda"; on a machine without one that would fail while loading.
            logger.warning("device %r requested but CUDA is not available: using cpu", device)
            kwargs["device"] = "cpu"
        super().__init__(pretrained=pretrained, **kwargs)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            # HFLM shards documents over processes only when it counts more than one GPU.
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
            self._device = accelerator.device
            logger.info("data parallel: process %d of %d on %s", self._rank, self._world_size, self._device)

    def _model_call(
        self,
        inps: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``HFLM._model_call`` without a KV cache for a causal LM's scoring forward.

        Why: HFLM calls ``self.model(inps)``, so transformers builds a ``DynamicCache`` of every
        layer's keys and values (a ``torch.cat`` per layer and call, and the cache's memory) that no
        loglikelihood request reads. The logits are the same. ``benchmarks/eval_throughput.py
        --compare-stock-call`` times both on one model object. Seq2seq calls (``attn_mask`` /
        ``labels``) go to HFLM unchanged.
        """
        if attn_mask is not None or labels is not None or self.backend != "causal":
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, use_cache=False).logits

    def _get_config(self, pretrained: str, **kwargs: Any) -> None:
        if not is_expanded(pretrained):
            super()._get_config(pretrained, **kwargs)
            return
        # transformers reads our model_type only through the remote-code config class; we use the
        # package's own copy of that class instead of running the file in the directory.
        # _create_model then replaces it by the loaded model's base-architecture config.
        config: PretrainedConfig = SparseExpansionConfig.from_pretrained(pretrained)
        self._config = config

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
        model = load_expanded(pretrained, device="cpu", dtype=None if torch_dtype == "auto" else torch_dtype)
        self._config = cast(PretrainedConfig, model.config)  # the base architecture's config
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
    model_registry.register(MODEL_NAME, target=SparseExpansionLM)


register()
