"""The SparseGPT solver we own: pure tensor functions, batched over experts, per-row targets."""

from sparse_expansion_plugin.pruning.sparsegpt import accumulate_hessian, sparsegpt_prune

__all__ = ["accumulate_hessian", "sparsegpt_prune"]
