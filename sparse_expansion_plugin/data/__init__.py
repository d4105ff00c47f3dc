"""Offline-first models and text: the embedded SmolLM2 and the bundled text splits."""

from sparse_expansion_plugin.data.models import (
    DEFAULT_MODEL,
    clear_quantization_state,
    default_model_dir,
    load_model_and_tokenizer,
    resolve_model_path,
)
from sparse_expansion_plugin.data.text import SOURCES, bundled_text, text_for, token_windows

__all__ = [
    "DEFAULT_MODEL",
    "SOURCES",
    "bundled_text",
    "clear_quantization_state",
    "default_model_dir",
    "load_model_and_tokenizer",
    "resolve_model_path",
    "text_for",
    "token_windows",
]
