"""Save and load expanded models as Hugging Face directories.

Layout of a saved directory (format 2):
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                             every tensor; expanded linears as ``<name>.values / .mask / .nnz
                             (/.bias, /.router.weight, /.router.bias)``, block routers as
                             ``<mlp>.se_router.weight / .bias``; sharded by ``max_shard_size``
  config.json                the base config with ``model_type: sparse_expansion``, the base type
                             in ``base_model_type``, the ``sparse_expansion`` spec (``spec.py``)
                             and an ``auto_map`` to ``modeling_sparse_expansion.py``
  modeling_sparse_expansion.py   copied from ``remote_code/``; it calls :func:`load_expanded`
  tokenizer files, generation_config.json

Why ``model_type: sparse_expansion``: with the base type left in place (0.1.0),
``AutoModelForCausalLM.from_pretrained(dir)`` without remote code silently built
the base model with randomly initialised MLPs. transformers does not know our
type, so without ``trust_remote_code=True`` it now refuses and says to pass it.

Why we write it ourselves: llm-compressor's wrapped ``save_pretrained``
rewrites config.json from the original model after oneshot (dropping custom
fields and ``auto_map``), and packed experts are buffers of our own layout.
Tensors go through ``huggingface_hub.save_torch_state_dict`` (sharding, the
index file, and safetensors' handling of tied tensors). Everything is written
to a temporary sibling directory and renamed at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from sparse_expansion_plugin.data.locations import resolve_model_location
from sparse_expansion_plugin.outputs import atomic_output_dir
from sparse_expansion_plugin.sparse_expansion.block import expansion_spec, install_spec
from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears, is_expanded
from sparse_expansion_plugin.sparse_expansion.spec import (
    FORMAT_VERSION,
    ExpansionSpec,
    parse_spec,
    spec_from_v1,
)

logger = logging.getLogger(__name__)

CONFIG_KEY = "sparse_expansion"
MODEL_TYPE = "sparse_expansion"
REMOTE_CODE = Path(__file__).parent / "remote_code" / "modeling_sparse_expansion.py"
AUTO_MAP = {
    "AutoConfig": "modeling_sparse_expansion.SparseExpansionConfig",
    "AutoModelForCausalLM": "modeling_sparse_expansion.SparseExpansionForCausalLM",
}
_OUR_KEYS = ("base_model_type", "base_architectures", CONFIG_KEY, "auto_map")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_expanded(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an expanded ``model`` (and ``tokenizer``, may be None) to ``output_dir``; return its path.

    Loadable by :func:`load_expanded` and by ``AutoModelForCausalLM.from_pretrained(dir,
    trust_remote_code=True)``. Shards above ``max_shard_size`` (as ``save_pretrained``).
    Refuses to replace an existing directory with files in it unless ``overwrite``;
    written atomically (``outputs.atomic_output_dir``).
    """
    from huggingface_hub import save_torch_state_dict

    if not is_expanded(model):
        raise ValueError("model has no ExpandedLinear layers; save it with model.save_pretrained instead")
    spec = expansion_spec(model)
    base: Any = model.config  # a PretrainedConfig
    with atomic_output_dir(output_dir, overwrite) as tmp:
        config = copy.deepcopy(base).to_dict()
        for key in _OUR_KEYS:
            config.pop(key, None)
        config.update(
            {
                "model_type": MODEL_TYPE,
                "base_model_type": base.model_type,
                "architectures": ["SparseExpansionForCausalLM"],
                "base_architectures": [type(model).__name__],
                "auto_map": dict(AUTO_MAP),
                CONFIG_KEY: spec.model_dump(),
            }
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        generation_config: Any = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        shutil.copy2(REMOTE_CODE, tmp / REMOTE_CODE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    target = Path(output_dir)
    logger.info("saved expanded model (%d expanded linears) to %s", len(expanded_linears(model)), target)
    return target


def _read_config(root: Path) -> dict[str, Any] | None:
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_expanded_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory written by :func:`save_expanded` (any format)."""
    config = _read_config(Path(path))
    return config is not None and CONFIG_KEY in config


def _resolve_dir(path: str | os.PathLike[str]) -> Path:
    """A local directory, or a hub name downloaded first (then the same code path)."""
    location = resolve_model_location(path)
    if isinstance(location, Path):
        if not location.is_dir():
            raise FileNotFoundError(f"expanded model {location} is not a directory")
        return location
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(location))


def _load_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (one file or the shards of an index); clear errors if broken."""
    index = root / INDEX_NAME
    files = [root / WEIGHTS_NAME]
    if not files[0].is_file():
        if not index.is_file():
            raise FileNotFoundError(
                f"{root} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; the checkpoint is incomplete"
            )
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index ({error}); re-save the model") from None
        files = [root / shard for shard in sorted(set(weight_map.values()))]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{file} is not a readable safetensors file ({error}); re-save the model"
            ) from None
    return tensors


def _base_config(config: dict[str, Any], where: str) -> tuple[Any, str]:
    """The base transformers config (format 2 stores it under our model type) and the causal-LM class name."""
    from transformers import CONFIG_MAPPING

    base = {k: v for k, v in config.items() if k not in _OUR_KEYS}
    model_type = str(config.get("base_model_type", config.get("model_type")))
    architectures = config.get("base_architectures", config.get("architectures")) or []
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: base model type {model_type!r} is not known to this transformers version")
    base["model_type"] = model_type
    base["architectures"] = architectures
    return CONFIG_MAPPING[model_type].from_dict(base), (architectures[0] if architectures else "")


def _base_class(config: Any, architecture: str) -> Any:
    """The transformers causal-LM class of ``config``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in (architecture, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)):
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"no transformers causal-LM class for model_type {config.model_type!r}")


def _check_tensors(spec: ExpansionSpec, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a checkpoint whose expert or router tensors disagree with the spec or hold non-finite values."""
    problems: list[str] = []
    shapes = spec.tensor_shapes()
    for name, shape in shapes.items():
        tensor = tensors.get(name)
        if tensor is None:
            problems.append(f"missing tensor {name}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"tensor {name} holds NaN or inf values")
    for block_name, block in spec.blocks.items():
        prefix = f"{block_name}." if block_name else ""
        for leaf, linear in block.linears.items():
            name = f"{prefix}{leaf}"
            nnz, mask = tensors.get(f"{name}.nnz"), tensors.get(f"{name}.mask")
            if (
                nnz is None
                or mask is None
                or f"{name}.nnz" in problems
                or tuple(nnz.shape) != shapes[f"{name}.nnz"]
            ):
                continue
            if tuple(mask.shape) != shapes[f"{name}.mask"]:
                continue
            bits = np.unpackbits(mask.numpy(), axis=-1, count=linear.in_features)
            per_expert = bits.reshape(linear.num_experts, -1).sum(axis=1)
            if (nnz < 0).any() or per_expert.tolist() != nnz.tolist():
                problems.append(
                    f"{name}: the mask keeps {per_expert.tolist()} weights per expert but nnz says {nnz.tolist()}"
                )
            elif int(nnz.sum()) != linear.nnz_total:
                problems.append(
                    f"{name}.nnz sums to {int(nnz.sum())}, but {name}.values holds {linear.nnz_total}"
                )
    if problems:
        shown = "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
        raise ValueError(
            f"corrupt Sparse Expansion checkpoint {where}: {shown}. Re-save it with save_expanded."
        )


def read_spec(root: Path, config: dict[str, Any]) -> tuple[ExpansionSpec, dict[str, str]]:
    """The spec of a saved directory and the tensor renames an old format needs."""
    block = config.get(CONFIG_KEY)
    version = block.get("format_version") if isinstance(block, dict) else None
    if version == 1:
        logger.warning(
            "%s was saved by sparse-expansion-plugin 0.1.0 (format 1); loading it by conversion. "
            "Re-save it with save_expanded to write format %d.",
            root,
            FORMAT_VERSION,
        )
        return spec_from_v1(block, str(root))  # type: ignore[arg-type]
    if isinstance(block, dict) and version not in (None, FORMAT_VERSION):
        raise ValueError(
            f"{root}: sparse_expansion format {version!r} is not one this version reads (1, {FORMAT_VERSION}); "
            "upgrade sparse-expansion-plugin"
        )
    return parse_spec(block, str(root)), {}


def load_expanded(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Load a directory written by :func:`save_expanded` without remote code; returns the model in eval mode.

    Checks everything before the model is used: the spec (a schema), every expert and
    router tensor's shape, mask bit counts against ``nnz``, and finiteness; a problem is
    an error naming the tensor. Directories of format 1 (0.1.0) are converted on the fly.
    """
    root = _resolve_dir(path)
    config = _read_config(root)
    if config is None or CONFIG_KEY not in config:
        raise ValueError(
            f"{root} is not a Sparse Expansion model (config.json has no '{CONFIG_KEY}' block); "
            "load it with AutoModelForCausalLM.from_pretrained"
        )
    spec, renames = read_spec(root, config)
    base_config, architecture = _base_config(config, str(root))
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    model_dtype = dtype or getattr(base_config, "dtype", None) or torch.float32
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype)
    tensors = _load_tensors(root)
    tensors = {renames.get(name, name): tensor for name, tensor in tensors.items()}
    _check_tensors(spec, tensors, str(root))

    model = _base_class(base_config, architecture)._from_config(base_config, dtype=model_dtype)
    install_spec(model, spec, dtype=model_dtype)
    expected = model.state_dict()
    tied_groups: dict[int, set[str]] = {}
    for name, tensor in expected.items():
        tied_groups.setdefault(tensor.data_ptr(), set()).add(name)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # a tied tensor is saved once (safetensors drops shared storage): fine if a partner was loaded
    missing = [k for k in missing if not (tied_groups[expected[k].data_ptr()] - set(missing))]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {root} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.eval()
    if device is not None:
        model.to(device)
    return model


def shard_count(root: str | os.PathLike[str]) -> int:
    """How many safetensors files a saved directory holds (1 when unsharded)."""
    index = Path(root) / INDEX_NAME
    if not index.is_file():
        return 1
    return len(set(json.loads(index.read_text())["weight_map"].values()))


__all__ = ["is_expanded_dir", "load_expanded", "save_expanded", "shard_count"]
