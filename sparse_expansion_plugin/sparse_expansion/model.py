"""Save and load expanded models as normal Hugging Face directories.

Layout of a saved directory:
  model.safetensors          every tensor of the model; expanded linears as
                             ``<name>.values / .mask / .nnz (/.bias)``, routers as
                             ``<mlp>.se_router_<leaf>.weight / .bias``
  config.json                the base config plus a ``sparse_expansion`` block
                             (shapes of every router and expanded linear) and an
                             ``auto_map`` to ``modeling_sparse_expansion.py``
  modeling_sparse_expansion.py   copied from ``remote_code/``; it calls :func:`load_expanded`
  tokenizer files, generation_config.json

Why we write it ourselves: llm-compressor's wrapped ``save_pretrained``
rewrites config.json from the original model after oneshot (dropping custom
fields and ``auto_map``), and compact experts are buffers of our own layout.
Everything is written to a temporary sibling directory and renamed at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from sparse_expansion_plugin.outputs import atomic_output_dir
from sparse_expansion_plugin.sparse_expansion.layer import (
    ExpandedLinear,
    expanded_linears,
    is_expanded,
    replace_module,
)
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

logger = logging.getLogger(__name__)

CONFIG_KEY = "sparse_expansion"
FORMAT_VERSION = 1
REMOTE_CODE = Path(__file__).parent / "remote_code" / "modeling_sparse_expansion.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_sparse_expansion.SparseExpansionForCausalLM"}
WEIGHTS_NAME = "model.safetensors"


def expansion_block(model: nn.Module) -> dict[str, Any]:
    """The ``sparse_expansion`` config block: shapes of every router and expanded linear."""
    linears = expanded_linears(model)
    routers = {name: m for name, m in model.named_modules() if isinstance(m, ExpertRouter)}
    router_names = {id(m): name for name, m in routers.items()}
    block: dict[str, Any] = {"format_version": FORMAT_VERSION, "routers": {}, "linears": {}}
    for name, router in routers.items():
        block["routers"][name] = {"in_features": router.in_features, "num_experts": router.num_experts}
    for name, layer in linears.items():
        router_name = router_names.get(id(layer.router))
        if router_name is None:
            raise ValueError(f"the router of {name} is not a submodule of the model; cannot save it")
        block["linears"][name] = {
            "router": router_name,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "num_experts": layer.num_experts,
            "nnz_total": layer.values.numel(),
            "bias": layer.bias is not None,
            "reuse_routing": bool(layer.reuse_routing),
        }
    return block


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage); first name wins."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_expanded(
    model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write an expanded ``model`` (and ``tokenizer``, may be None) to ``output_dir``; return its path.

    Loadable by ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and by
    :func:`load_expanded`. Refuses to replace an existing directory with files in it unless
    ``overwrite``; written atomically (``outputs.atomic_output_dir``).
    """
    if not is_expanded(model):
        raise ValueError("model has no ExpandedLinear layers; save it with model.save_pretrained instead")
    with atomic_output_dir(output_dir, overwrite) as tmp:
        config: Any = copy.deepcopy(
            model.config
        )  # a PretrainedConfig (nn.Module attributes type as Tensor | Module)
        setattr(config, CONFIG_KEY, expansion_block(model))
        config.auto_map = dict(AUTO_MAP)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_file(_unique_state_dict(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        generation_config: Any = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        shutil.copy2(REMOTE_CODE, tmp / REMOTE_CODE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    target = Path(output_dir)
    logger.info("saved expanded model (%d expanded linears) to %s", len(expanded_linears(model)), target)
    return target


def is_expanded_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory written by :func:`save_expanded`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _resolve_dir(path: str | os.PathLike[str]) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if os.path.sep in str(path) or str(path).startswith("."):
        raise FileNotFoundError(f"expanded model directory {path} does not exist")
    from huggingface_hub import snapshot_download  # a hub name: same code path once downloaded

    return Path(snapshot_download(str(path)))


def _load_tensors(root: Path) -> dict[str, torch.Tensor]:
    single = root / WEIGHTS_NAME
    if single.is_file():
        return load_file(single)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(root / shard))
        return tensors
    raise FileNotFoundError(f"{root} has no {WEIGHTS_NAME}; the checkpoint is incomplete")


def _base_class(config: Any) -> Any:
    """The transformers causal-LM class of ``config`` (not the remote shim transformers may have registered)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in [
        *(getattr(config, "architectures", None) or []),
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type),
    ]:
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"no transformers causal-LM class for model_type {config.model_type!r}")


def load_expanded(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Load a directory written by :func:`save_expanded` without remote code; returns the model in eval mode.

    Raises a clear error when the directory is not an expanded model, or when an
    expert tensor is missing or has the wrong shape.
    """
    from transformers import AutoConfig

    root = _resolve_dir(path)
    if not is_expanded_dir(root):
        raise ValueError(
            f"{root} is not a Sparse Expansion model (config.json has no '{CONFIG_KEY}' block); "
            "load it with AutoModelForCausalLM.from_pretrained"
        )
    config = AutoConfig.from_pretrained(root)
    block = getattr(config, CONFIG_KEY)
    if int(block.get("format_version", 0)) != FORMAT_VERSION:
        raise ValueError(
            f"{root}: sparse_expansion format {block.get('format_version')} is not {FORMAT_VERSION}"
        )
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    model_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype)
    model_cls = _base_class(config)
    model = model_cls._from_config(config, dtype=model_dtype)

    routers: dict[str, ExpertRouter] = {}
    for name, spec in block["routers"].items():
        routers[name] = ExpertRouter(int(spec["in_features"]), int(spec["num_experts"]))
        replace_module(model, name, routers[name])
    for name, spec in block["linears"].items():
        if spec["router"] not in routers:
            raise ValueError(f"{root}: linear {name} names router {spec['router']} which config.json lacks")
        layer = ExpandedLinear(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["num_experts"]),
            int(spec["nnz_total"]),
            routers[spec["router"]],
            bias=bool(spec["bias"]),
            dtype=model_dtype,
            reuse_routing=bool(spec.get("reuse_routing", False)),
        )
        replace_module(model, name, layer)

    tensors = _load_tensors(root)
    expected = model.state_dict()
    problems = []
    for name in block["linears"]:
        for suffix in ("values", "mask", "nnz") + (("bias",) if block["linears"][name]["bias"] else ()):
            key = f"{name}.{suffix}"
            if key not in tensors:
                problems.append(f"missing expert tensor {key}")
            elif tuple(tensors[key].shape) != tuple(expected[key].shape):
                problems.append(
                    f"expert tensor {key} has shape {tuple(tensors[key].shape)}, config.json says {tuple(expected[key].shape)}"
                )
    for name in block["routers"]:
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key not in tensors:
                problems.append(f"missing router tensor {key}")
            elif tuple(tensors[key].shape) != tuple(expected[key].shape):
                problems.append(
                    f"router tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(expected[key].shape)}"
                )
    for name, layer_spec in block["linears"].items():
        key = f"{name}.nnz"
        if key in tensors and tensors[key].shape == (layer_spec["num_experts"],):
            if int(tensors[key].sum()) != layer_spec["nnz_total"]:
                problems.append(
                    f"{key} sums to {int(tensors[key].sum())}, but {name}.values holds {layer_spec['nnz_total']}"
                )
    if problems:
        raise ValueError(
            f"corrupt Sparse Expansion checkpoint {root}: "
            + "; ".join(problems[:10])
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
            + ". Re-save it with save_expanded."
        )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {root} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    model.eval()
    if device is not None:
        model.to(device)
    return model
