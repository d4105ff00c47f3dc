"""Perplexity (the package's one definition) and the lm-eval integration.

- ``perplexity``: ``token_perplexity`` / ``window_nlls`` over fixed windows.
- ``lm_eval_model``: the ``sparse-expansion`` lm-eval model (``HFLM`` that also
  loads expanded directories); importing it registers the model.
- ``lm_eval_registry``: ``register_lm_eval_model()``, a cheap lazy registration.
- ``lm_eval_task``: the task class of the token-perplexity task (keeps each
  window's first token as the context; see its docstring).
- ``lm_eval_cli``: the ``sparse-expansion-lm-eval`` console script.
- ``task_docs`` and ``tasks/``: the offline tasks (token perplexity over fixed
  windows, word/byte perplexity, multiple choice) built from the bundled text.

lm-eval itself is imported only by the ``lm_eval_*`` modules. Importing this
package imports nothing heavy: ``sparse_expansion_plugin`` imports it on every
start to register the lm-eval model, so the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "token_perplexity": "sparse_expansion_plugin.evaluation.perplexity",
    "window_nlls": "sparse_expansion_plugin.evaluation.perplexity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_expansion_plugin.evaluation' has no attribute {name!r}")


__all__ = sorted(_LAZY)
