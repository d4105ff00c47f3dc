"""Cheap, lazy registration of the ``sparse-expansion`` lm-eval model.

Registers a ``"module:Class"`` placeholder that lm-eval imports only when the
model is asked for, so calling this costs the import of ``lm_eval.models``
(about 0.07 s) rather than ``HFLM`` and our wrapper. ``lm_eval.models`` is
imported first because its import registers the built-in models; a model
registered before it would leave ``hf`` and the others missing.
"""

from __future__ import annotations

MODEL_NAME = "sparse-expansion"
MODEL_TARGET = "sparse_expansion_plugin.evaluation.lm_eval_model:SparseExpansionLM"


def register_lm_eval_model() -> bool:
    """Register ``sparse-expansion`` lazily; returns False (and does nothing) when lm-eval is not installed."""
    try:
        import lm_eval.models  # noqa: F401  (built-ins first)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    return True
