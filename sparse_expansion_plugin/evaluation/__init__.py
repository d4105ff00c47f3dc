"""Perplexity (the package's one definition) and the lm-eval integration.

- ``perplexity``: ``token_perplexity`` / ``window_nlls`` over fixed windows.
- ``lm_eval_model``: the ``sparse-expansion`` lm-eval model (``HFLM`` that also
  loads expanded directories); importing it registers the model.
- ``lm_eval_registry``: ``register_lm_eval_model()``, a cheap lazy registration.
- ``lm_eval_cli``: the ``sparse-expansion-lm-eval`` console script.
- ``task_docs`` and ``tasks/``: the offline tasks (token perplexity over fixed
  windows, word/byte perplexity, multiple choice) built from the bundled text.

lm-eval itself is imported only by the ``lm_eval_*`` modules.
"""

from sparse_expansion_plugin.evaluation.perplexity import token_perplexity, window_nlls

__all__ = ["token_perplexity", "window_nlls"]
