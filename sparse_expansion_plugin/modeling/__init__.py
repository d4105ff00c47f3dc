"""Model surgery for Sparse Expansion: FFN targets, the router, ``ExpandedLinear``, save and load."""

from __future__ import annotations

from sparse_expansion_plugin.modeling.expanded import ExpandedLinear, is_expanded, materialize_experts
from sparse_expansion_plugin.modeling.router import ExpertRouter
from sparse_expansion_plugin.modeling.save_load import is_expanded_dir, load_expanded, save_expanded

__all__ = [
    "ExpandedLinear",
    "ExpertRouter",
    "is_expanded",
    "is_expanded_dir",
    "load_expanded",
    "materialize_experts",
    "save_expanded",
]
