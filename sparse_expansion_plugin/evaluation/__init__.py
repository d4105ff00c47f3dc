"""Perplexity (the package's one definition) and the lm-eval integration."""

from sparse_expansion_plugin.evaluation.perplexity import token_perplexity, window_nlls

__all__ = ["token_perplexity", "window_nlls"]
