"""Sparse Expansion, in one place: a mixture of sparse experts built one-shot from a dense LLM.

What lives where:
  modifier.py    ``SparseExpansionModifier``: the llm-compressor modifier (fields and lifecycle)
  clustering.py  fitting a router on calibration inputs (PCA + k-means)
  hessians.py    per-cluster Hessians and the rules for small clusters
  router.py      ``ExpertRouter``: PCA + nearest centroid folded into one affine map
  layer.py       ``ExpandedLinear``: K packed experts applied under a routing
  packing.py     values + bitmask storage of K pruned copies of one weight
  model.py       save / load of expanded models as Hugging Face directories
  cost.py        bytes and FLOPs of an expanded model
"""

from __future__ import annotations

from sparse_expansion_plugin.sparse_expansion.layer import (
    ExpandedLinear,
    is_expanded,
    materialize_experts,
    store_experts_semi_structured,
)
from sparse_expansion_plugin.sparse_expansion.model import is_expanded_dir, load_expanded, save_expanded
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

__all__ = [
    "ExpandedLinear",
    "ExpertRouter",
    "is_expanded",
    "is_expanded_dir",
    "load_expanded",
    "materialize_experts",
    "store_experts_semi_structured",
    "save_expanded",
]
