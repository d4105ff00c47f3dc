"""Offline-first models and text: the embedded SmolLM2 and the bundled text splits.

Names are imported on first use (PEP 562): ``data.locations`` is light, but
``data.models`` and ``data.text`` import torch and transformers, and the CLI's
``--help`` must not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "DEFAULT_MODEL": "sparse_expansion_plugin.data.locations",
    "cache_dir": "sparse_expansion_plugin.data.locations",
    "check_model_dir": "sparse_expansion_plugin.data.locations",
    "resolve_model_location": "sparse_expansion_plugin.data.locations",
    "clear_quantization_state": "sparse_expansion_plugin.data.models",
    "default_model_dir": "sparse_expansion_plugin.data.models",
    "load_model_and_tokenizer": "sparse_expansion_plugin.data.models",
    "resolve_model_path": "sparse_expansion_plugin.data.models",
    "SOURCES": "sparse_expansion_plugin.data.text",
    "bundled_text": "sparse_expansion_plugin.data.text",
    "text_for": "sparse_expansion_plugin.data.text",
    "token_windows": "sparse_expansion_plugin.data.text",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_expansion_plugin.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
