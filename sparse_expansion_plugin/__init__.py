"""Wasserstein neurons and Sparse Expansion for llm-compressor and lm-evaluation-harness.

Importing the package is cheap (no torch, no llm-compressor) and makes its
plugins findable by name:

- the llm-compressor modifiers ``WassersteinSparseGPTModifier`` and
  ``SparseExpansionModifier``, so a YAML recipe can name them like built-ins.
  They are registered with ``ModifierFactory`` when llm-compressor is (or
  once it gets) imported, in either import order; see ``modifiers``.
- the lm-eval model ``sparse-expansion`` (a lazy placeholder: the wrapper
  loads only when it is asked for); see ``evaluation.lm_eval_registry``.

Public names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparse_expansion_plugin.evaluation.lm_eval_registry import register_lm_eval_model
from sparse_expansion_plugin.modifiers import MODIFIER_MODULES, register_modifiers_when_llmcompressor_loads

__version__ = "0.1.0"

# Public names -> defining module, imported on first use (torch/transformers-heavy).
_LAZY: dict[str, str] = {
    **MODIFIER_MODULES,
    "load_model_and_tokenizer": "sparse_expansion_plugin.data.models",
    "token_windows": "sparse_expansion_plugin.data.text",
    "token_perplexity": "sparse_expansion_plugin.evaluation.perplexity",
    "wd_to_gaussian": "sparse_expansion_plugin.metrics.wasserstein",
    "mapping_difficulty": "sparse_expansion_plugin.metrics.mapping",
    "load_expanded": "sparse_expansion_plugin.sparse_expansion.model",
    "save_expanded": "sparse_expansion_plugin.sparse_expansion.model",
    "analyze_model": "sparse_expansion_plugin.analysis.analyze",
}

register_modifiers_when_llmcompressor_loads()
register_lm_eval_model()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_expansion_plugin' has no attribute {name!r}")


__all__ = sorted(_LAZY)
