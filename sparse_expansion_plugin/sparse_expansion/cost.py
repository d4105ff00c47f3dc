"""What a K-expert model costs: bytes stored and FLOPs per token, next to dense and plain SparseGPT.

Counted over the expanded linears only (attention, embeddings and norms are
the same in all three models). ``b`` bytes per value, ``P = out * in`` per
linear, sparsity ``s``, K experts:

- dense:                       ``b * P`` bytes, ``2 * P`` FLOPs per token
- SparseGPT, dense-with-zeros: ``b * P`` (how compressed-tensors saves it today)
- SparseGPT, values + bitmask: ``(b * (1 - s) + 1/8) * P``
- Sparse Expansion:            ``K * (b * (1 - s) + 1/8) * P`` plus routers ``4 * K * (d + 1)``
- routed FLOPs per token:      ``2 * P`` with a dense kernel (each token uses one expert),
  ``2 * (1 - s) * P`` counting only non-zeros, plus ``2 * K * d`` per router.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears
from sparse_expansion_plugin.sparse_expansion.packing import packed_bytes
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter


@dataclass
class ExpansionCost:
    """Totals over the expanded linears of a model (bytes, FLOPs per token)."""

    linears: int
    num_experts_mean: float
    density_mean: float
    dense_bytes: int
    sparsegpt_compact_bytes: int
    expanded_bytes: int
    router_bytes: int
    dense_flops_per_token: int
    routed_flops_per_token_dense_kernel: int
    routed_flops_per_token_nonzero: int
    router_flops_per_token: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def expansion_cost(model: nn.Module) -> ExpansionCost:
    """Bytes and per-token FLOPs of ``model``'s expanded linears, and of the same linears dense / SparseGPT."""
    layers = expanded_linears(model)
    if not layers:
        raise ValueError("model has no ExpandedLinear layers")
    routers = [m for m in model.modules() if isinstance(m, ExpertRouter)]  # each once, block or own
    dense_bytes = sgpt_bytes = expanded = dense_flops = nonzero_flops = 0
    experts = density = 0.0
    for layer in layers.values():
        params = layer.in_features * layer.out_features
        bytes_per_value = layer.values.element_size()
        kept = layer.values.numel() / layer.num_experts  # mean kept values per expert
        dense_bytes += params * bytes_per_value
        sgpt_bytes += int(kept * bytes_per_value + layer.mask[0].numel())
        expanded += packed_bytes(layer.values, layer.mask, layer.nnz)
        dense_flops += 2 * params
        nonzero_flops += int(2 * kept)
        experts += layer.num_experts
        density += kept / params
    router_bytes = sum(
        r.weight.numel() * r.weight.element_size() + r.bias.numel() * r.bias.element_size() for r in routers
    )
    router_flops = sum(2 * r.num_experts * r.in_features for r in routers)
    return ExpansionCost(
        linears=len(layers),
        num_experts_mean=experts / len(layers),
        density_mean=density / len(layers),
        dense_bytes=dense_bytes,
        sparsegpt_compact_bytes=sgpt_bytes,
        expanded_bytes=expanded + router_bytes,
        router_bytes=router_bytes,
        dense_flops_per_token=dense_flops,
        routed_flops_per_token_dense_kernel=dense_flops + router_flops,
        routed_flops_per_token_nonzero=nonzero_flops + router_flops,
        router_flops_per_token=router_flops,
    )


def linear_storage_bytes(weight: Tensor, compact: bool) -> int:
    """Bytes of one plain linear's weight: dense, or its non-zeros as values + a 1-bit mask (what a
    sparse format stores; the same layout as one packed expert)."""
    if not compact:
        return weight.numel() * weight.element_size()
    return int((weight != 0).sum()) * weight.element_size() + (weight.numel() + 7) // 8
