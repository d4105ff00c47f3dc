"""``ExpandedLinear``: K sparse experts of one linear layer, each token computed by its cluster's expert.

Why this shape: the reference implementation runs the dense layer *and* every
expert (zero-filled) on each call, batch size 1. Here tokens are grouped by
expert (one stable sort per MLP block, shared through the router's cache), each
expert does one matmul on its tokens, results are scattered back; the dense
weight is never computed. Experts live packed (values + bitmask, see
``compact.py``) and are unpacked only for the experts a call uses;
:func:`materialize_experts` trades memory for speed by keeping dense copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.packing import (
    pack_experts,
    packed_bytes,
    unpack_expert,
    unpack_mask,
)
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter


class ExpandedLinear(nn.Module):
    """A linear layer ``y = x W_k^T + b`` whose weight ``W_k`` depends on the token's expert ``k``.

    Buffers (saved): ``values [nnz_total]``, ``mask [K, out, ceil(in/8)]`` uint8,
    ``nnz [K]``; parameter ``bias [out]`` (shared by all experts) or None.
    The router is *not* a submodule (it is shared and lives on the MLP block);
    it is passed in and held by reference.
    """

    values: Tensor
    mask: Tensor
    nnz: Tensor
    bias: nn.Parameter | None
    dense_experts: Tensor | None  # non-persistent buffer: ``[K, in, out]`` when materialized

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        nnz_total: int,
        router: ExpertRouter,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        reuse_routing: bool = False,
    ) -> None:
        super().__init__()
        if router.num_experts != num_experts or (router.in_features != in_features and not reuse_routing):
            raise ValueError(
                f"router routes {router.in_features}-d inputs to {router.num_experts} experts, "
                f"but this layer has {in_features} inputs and {num_experts} experts"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.register_buffer("values", torch.zeros(nnz_total, dtype=dtype, device=device))
        self.register_buffer(
            "mask",
            torch.zeros(num_experts, out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device),
        )
        self.register_buffer("nnz", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("dense_experts", None, persistent=False)
        self._router = [router]  # a list, so the shared router is not registered twice
        self.reuse_routing = reuse_routing  # route by the MLP input's routing (down sharing gate/up's router)

    @property
    def router(self) -> ExpertRouter:
        return self._router[0]

    @classmethod
    def from_experts(
        cls,
        weights: Tensor,
        router: ExpertRouter,
        bias: Tensor | None = None,
        keep: Tensor | None = None,
        reuse_routing: bool = False,
    ) -> ExpandedLinear:
        """Pack pruned expert ``weights [K, out, in]`` (``keep`` bool mask, default non-zeros).

        ``reuse_routing``: route each token by the router's latest routing (of the MLP
        input) instead of routing this layer's own input.
        """
        values, mask, nnz = pack_experts(weights, keep)
        num_experts, out_features, in_features = weights.shape
        layer = cls(
            in_features,
            out_features,
            num_experts,
            values.numel(),
            router,
            bias=bias is not None,
            dtype=weights.dtype,
            device=weights.device,
            reuse_routing=reuse_routing,
        )
        layer.values.copy_(values)
        layer.mask.copy_(mask)
        layer.nnz.copy_(nnz)
        if bias is not None and layer.bias is not None:  # built with a bias exactly when one is given
            layer.bias.data.copy_(bias.detach())
        return layer

    def expert_weight(self, k: int) -> Tensor:
        """Dense weight ``[out, in]`` of expert ``k`` (unpacked, or a transposed view when materialized)."""
        if self.dense_experts is not None:
            return self.dense_experts[k].t()
        offset = int(self.nnz[:k].sum()) if k else 0
        return unpack_expert(self.values, self.mask[k], offset, self.in_features)

    def expert_keep_mask(self, k: int) -> Tensor:
        """Bool keep mask ``[out, in]`` of expert ``k``."""
        return unpack_mask(self.mask[k], self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., out]``; each token's row uses its routed expert only."""
        routing = self.router.last_routing if self.reuse_routing else self.router(x)
        flat = x.reshape(-1, self.in_features)
        used = [k for k, c in enumerate(routing.counts) if c]
        if len(used) == 1:  # one expert for every token (typical while decoding one token)
            out = flat @ self.expert_weight(used[0]).t()
        else:
            grouped = routing.grouped_input
            if self.reuse_routing or grouped is None or grouped.dtype != flat.dtype:
                grouped = flat.index_select(0, routing.order)  # gather once per input, not per linear
                if not self.reuse_routing:
                    routing.grouped_input = grouped
            parts, start = [], 0
            for k, count in enumerate(routing.counts):
                if count:
                    parts.append(grouped[start : start + count] @ self.expert_weight(k).t())
                    start += count
            result = torch.cat(parts)
            out = torch.empty_like(result).index_copy_(0, routing.order, result)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def stored_bytes(self) -> int:
        """Bytes of the packed experts and bias (the router is counted on the block)."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return packed_bytes(self.values, self.mask, self.nnz) + bias

    def materialize(self, enable: bool = True, experts: Tensor | None = None) -> int:
        """Keep dense copies of all experts (``enable``) or drop them; returns their bytes.

        ``experts [K, out, in]``: the dense pruned weights this layer was packed from, when
        the caller still has them (the modifier does), so nothing is unpacked.
        """
        if not enable:
            self.dense_experts = None
            return 0
        self.dense_experts = None
        # stored [K, in, out]: ``x @ W_k^T`` is then a plain (non-transposed) GEMM, which measured
        # faster for the per-expert row blocks than the transposed layout on CPU
        if experts is not None:
            expected = (self.num_experts, self.out_features, self.in_features)
            if tuple(experts.shape) != expected:
                raise ValueError(f"experts must be {list(expected)}, got {list(experts.shape)}")
            dense = experts.detach().to(device=self.values.device, dtype=self.values.dtype)
            self.dense_experts = dense.transpose(1, 2).contiguous()
        else:
            self.dense_experts = torch.stack(
                [self.expert_weight(k).t().contiguous() for k in range(self.num_experts)]
            )
        return self.dense_experts.numel() * self.dense_experts.element_size()

    def extra_repr(self) -> str:
        dense = self.num_experts * self.in_features * self.out_features
        density = self.values.numel() / dense if dense else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, density={density:.3f}, bias={self.bias is not None}"
            + (", reuse_routing=True" if self.reuse_routing else "")
        )


def expanded_linears(model: nn.Module) -> dict[str, ExpandedLinear]:
    """Every ``ExpandedLinear`` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpandedLinear)}


def is_expanded(model: nn.Module) -> bool:
    """Whether ``model`` holds Sparse Expansion experts (and must be saved with ``save_expanded``)."""
    return any(isinstance(m, ExpandedLinear) for m in model.modules())


def materialize_experts(model: nn.Module, enable: bool = True) -> int:
    """Keep (or drop, ``enable=False``) dense copies of every expert for faster forwards.

    Why optional: unpacking costs one pass over each used expert's weight per
    call; dense copies remove that at K times the dense layer's memory.
    Returns the bytes the dense copies take.
    """
    return sum(layer.materialize(enable) for layer in expanded_linears(model).values())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set ``model.<name> = module`` (dotted name)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
