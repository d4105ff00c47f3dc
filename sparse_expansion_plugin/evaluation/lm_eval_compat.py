"""One narrow fix to lm-eval 0.4.13 that the fixed-window token-perplexity task needs.

``TemplateLM._encode_pair`` moves trailing whitespace from the context to the
continuation. When the context is *only* whitespace (a window whose first
token is ``"\\n"`` or an indent, about 3% of SmolLM2's 512-token windows) the
context becomes empty and ``HFLM._loglikelihood_tokens`` fails its
``assert len(context_enc) > 0`` (or, with ``add_bos_token``, silently scores
against BOS instead). We keep a whitespace-only context as it is. Every other
request is encoded by lm-eval's own code, so no working behaviour changes.
Applied when our lm-eval model or our task utilities are imported, so stock
``lm_eval --model hf --include_path ...`` gets it too.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

_PATCHED = "_sparse_expansion_keeps_whitespace_context"


def keep_whitespace_only_context() -> None:
    """Patch ``lm_eval.api.model.TemplateLM._encode_pair`` once (idempotent)."""
    from lm_eval.api.model import TemplateLM

    original = TemplateLM._encode_pair
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context and not context.strip() and getattr(self, "backend", "causal") == "causal":
            whole = self.tok_encode(context + continuation)
            context_enc = self.tok_encode(context)
            return context_enc, whole[len(context_enc) :]
        return original(self, context, continuation)

    setattr(_encode_pair, _PATCHED, True)
    TemplateLM._encode_pair = _encode_pair
    logger.debug("lm-eval: whitespace-only contexts are kept (TemplateLM._encode_pair patched)")
