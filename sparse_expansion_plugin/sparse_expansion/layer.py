"""``ExpandedLinear``: K packed sparse experts of one linear layer, applied under a given routing.

Why this shape: the reference implementation runs the dense layer *and* every
expert (zero-filled) on each call, batch size 1. Here tokens are grouped by
expert (the routing's stable sort), each expert does one matmul on its tokens,
and results are scattered back; the dense weight is never computed. Experts
live packed (values + bitmask, ``packing.py``) and are unpacked per call;
:func:`materialize_experts` trades memory for speed.

Two forwards, the same result (``grouped.py`` holds the matmuls):

- with host counts (CPU): the routing's counts are read once per MLP call
  (no device to wait for on CPU), so a packed layer unpacks only the experts
  the call uses (each into one reused buffer just before its matmul), and a
  call whose tokens all go to one expert (decoding) is one plain matmul with
  that expert;
- on the device (any accelerator): nothing is read back. All K experts are
  unpacked in one kernel (or the dense copies used) and applied by grouped
  GEMM; a call with fewer tokens than experts (decoding) gathers each token's
  expert on the device instead (T weights touched, not K).

:attr:`ExpandedLinear.routed_path` forces one (tests, benchmarks). A third
storage, for 2:4 experts on CUDA, takes precedence over both:
:meth:`ExpandedLinear.store_semi_structured` keeps each expert as torch's
semi-structured sparse tensor, multiplied by the sparse tensor cores without
unpacking (one host read of the counts per call, then one matmul per used expert).

Where the routing comes from: a layer that routes its *own* input owns a
router (a registered submodule, ``<layer>.router``); a layer routed by its MLP
block's router receives the block's routing for the duration of one MLP call
(``block.py`` sets :attr:`ExpandedLinear.block_routing` before the MLP's forward
and clears it after), so nothing depends on the order in which layers run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.grouped import (
    grouped_matmul,
    grouped_mm_usable,
    padded_matmul,
    per_token_matmul,
)
from sparse_expansion_plugin.sparse_expansion.packing import (
    device_unpack_bytes,
    expert_bounds,
    gather_unpack_bytes,
    pack_experts,
    packed_bytes,
    unpack_expert,
    unpack_expert_into,
    unpack_experts,
    unpack_experts_at,
    unpack_mask,
)
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter, Routing
from sparse_expansion_plugin.sparse_expansion.semi_structured import (
    is_two_four,
    semi_structured_bytes,
    semi_structured_problem,
    to_semi_structured,
)

logger = logging.getLogger(__name__)

RoutedPath = Literal["auto", "host", "device"]
ROUTED_PATHS: tuple[str, ...] = ("auto", "host", "device")


class ExpandedLinear(nn.Module):
    """A linear layer ``y = x W_k^T + b`` whose weight ``W_k`` depends on the token's expert ``k``.

    Buffers (saved): ``values [nnz_total]``, ``mask [K, out, ceil(in/8)]`` uint8,
    ``nnz [K]``; parameter ``bias [out]`` (shared by all experts) or None;
    submodule ``router`` when this layer routes its own input (else None, and
    its MLP block hands it a routing per call).
    """

    values: Tensor
    mask: Tensor
    nnz: Tensor
    bias: nn.Parameter | None
    router: ExpertRouter | None
    dense_experts: Tensor | None  # ``[K, in, out]`` when materialized: a plain attribute, never saved
    semi_structured_experts: list[Tensor] | None  # K ``[out, in]`` semi-structured (CUDA 2:4), never saved
    # "auto": host counts on CPU, the device forward elsewhere; "host" / "device" force one (not saved)
    routed_path: RoutedPath = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        nnz_total: int,
        router: ExpertRouter | None = None,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if router is not None and (router.num_experts != num_experts or router.in_features != in_features):
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
        self.router = router
        # not a buffer: an offloaded module (compressed-tensors' OffloadCache) must not write
        # temporary dense copies to its offload device; `_apply` moves it with the module instead
        self.dense_experts = None
        self.semi_structured_experts = None
        self.block_routing: Routing | None = None  # set by the MLP block for one call (block.py)
        self._bounds: list[int] | None = None  # where each expert's values start and end (host ints)
        self._starts: Tensor | None = None  # the starts on the device the values live on (device forward)

    @property
    def routes_own_input(self) -> bool:
        return self.router is not None

    @classmethod
    def from_experts(
        cls,
        weights: Tensor,
        router: ExpertRouter | None = None,
        bias: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> ExpandedLinear:
        """Pack pruned expert ``weights [K, out, in]`` (``keep`` bool mask, default non-zeros).

        ``router``: this layer's own router, or None for a layer routed by its MLP block.
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
        )
        layer.values.copy_(values)
        layer.mask.copy_(mask)
        layer.nnz.copy_(nnz)
        layer.refresh_offsets()
        if bias is not None and layer.bias is not None:  # built with a bias exactly when one is given
            layer.bias.data.copy_(bias.detach())
        return layer

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        placed = (self.values.device, self.values.dtype)
        super()._apply(fn, recurse)
        if self.dense_experts is not None:
            self.dense_experts = fn(self.dense_experts)
        moved = (self.values.device, self.values.dtype) != placed
        if self.semi_structured_experts is not None and moved:
            # torch cannot move or cast a semi-structured tensor: drop them, back to the packed forward
            logger.warning(
                "semi-structured experts dropped on moving or casting the layer; call "
                "store_experts_semi_structured(model) again on the new device"
            )
            self.semi_structured_experts = None
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_offsets()  # new nnz: where each expert's values start

    def refresh_offsets(self) -> None:
        """Recompute where each expert's values start (host ints, so a forward never syncs for them)."""
        self._bounds = expert_bounds(self.nnz) if self.nnz.device.type != "meta" else None
        self._starts = None

    @property
    def expert_bounds(self) -> list[int]:
        """``[K + 1]`` host ints: expert k's values are ``values[bounds[k]:bounds[k + 1]]`` (computed once)."""
        if self._bounds is None:
            self.refresh_offsets()
        if self._bounds is None:
            raise RuntimeError("this ExpandedLinear's nnz is on the meta device: load its weights first")
        return self._bounds

    def _starts_on(self, device: torch.device) -> Tensor:
        """``[K]`` expert starts as a tensor on ``device`` (built once per device, not per call)."""
        if self._starts is None or self._starts.device != device:
            self._starts = torch.tensor(self.expert_bounds[:-1], dtype=torch.long, device=device)
        return self._starts

    def expert_weight(self, k: int) -> Tensor:
        """Dense weight ``[out, in]`` of expert ``k`` (unpacked, or a transposed view when materialized)."""
        if self.dense_experts is not None:
            return self.dense_experts[k].t()
        return unpack_expert(self.values, self.mask[k], self.expert_bounds[k], self.in_features)

    def expert_keep_mask(self, k: int) -> Tensor:
        """Bool keep mask ``[out, in]`` of expert ``k``."""
        return unpack_mask(self.mask[k], self.in_features)

    def routing_for(self, x: Tensor) -> Routing:
        """This call's routing: the own router's on ``x``, or the one the MLP block handed over."""
        if self.router is not None:
            return self.router(x)
        if self.block_routing is None:
            raise RuntimeError(
                "this ExpandedLinear is routed by its MLP block's router, but was called outside that "
                "block's forward (no routing was handed to it); call the MLP module, not the linear alone"
            )
        return self.block_routing

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., out]``; each token's row uses its routed expert only."""
        if x.device.type == "meta":  # shape inference (e.g. a memory planner on a meta model)
            return x.new_empty(*x.shape[:-1], self.out_features)
        routing = self.routing_for(x)
        flat = x.reshape(-1, self.in_features)
        if routing.num_tokens != flat.shape[0]:
            raise RuntimeError(
                f"routing covers {routing.num_tokens} tokens but the input has {flat.shape[0]}; the block "
                "routing was computed for another input"
            )
        if flat.shape[0] == 0:  # no tokens: same as nn.Linear on an empty input
            out = flat.new_zeros(0, self.out_features)
        elif self.semi_structured_experts is not None:
            out = self._forward_semi_structured(flat, routing, self.semi_structured_experts)
        elif self._on_device(flat):
            out = self._forward_on_device(flat, routing)
        else:
            out = self._forward_with_host_counts(flat, routing)
        if self.bias is not None:
            out = out.add_(self.bias)  # `out` is always a fresh tensor here
        return out.reshape(*x.shape[:-1], self.out_features)

    def _on_device(self, flat: Tensor) -> bool:
        if self.routed_path not in ROUTED_PATHS:
            raise ValueError(f"routed_path must be one of {ROUTED_PATHS}, got {self.routed_path!r}")
        if self.routed_path == "auto":
            return flat.device.type != "cpu"
        return self.routed_path == "device"

    def _forward_with_host_counts(self, flat: Tensor, routing: Routing) -> Tensor:
        """One host read of the counts; only the used experts are unpacked, each just before its matmul.

        Why expert by expert here (the device forward unpacks all in one kernel): on CPU
        an expert unpacked into one reused buffer is still in cache for its matmul, and no
        large fresh allocation is touched per call; 16 experts of 1536 x 576 with 128
        tokens each measured 62-68 ms this way against 90-104 ms unpacking all first.
        """
        # autograd keeps each matmul's weight for the input's gradient: no shared buffer then
        keeps_weights = torch.is_grad_enabled() and flat.requires_grad
        buffer = None
        if self.dense_experts is None and not keeps_weights:
            buffer = torch.empty(self.out_features, self.in_features, dtype=self.values.dtype)
        return self._per_used_expert(flat, routing, lambda k, rows: rows @ self._host_weight(k, buffer))

    def _per_used_expert(
        self, flat: Tensor, routing: Routing, apply: Callable[[int, Tensor], Tensor]
    ) -> Tensor:
        """One host read of the counts, then ``apply(k, rows)`` for each used expert's rows, written back in place.

        Shared by the CPU path (dense or unpacked experts) and the semi-structured one: each expert's
        rows go straight to their tokens' places (no concatenation pass), and when every token is on
        one expert (typical while decoding) it is one call on the input as it is.
        """
        counts = routing.host_counts
        used = [k for k, c in enumerate(counts) if c]
        if len(used) == 1:
            return apply(used[0], flat)
        grouped = routing.grouped(flat)  # gathered once per MLP input, shared by gate and up
        out = flat.new_empty(flat.shape[0], self.out_features)
        start = 0
        for k in used:
            rows = slice(start, start + counts[k])
            out.index_copy_(0, routing.order[rows], apply(k, grouped[rows]))
            start += counts[k]
        return out

    def _host_weight(self, k: int, buffer: Tensor | None) -> Tensor:
        """Expert ``k`` as ``[in, out]``: a view of its dense copy, or unpacked (into ``buffer`` if given)."""
        if self.dense_experts is not None:
            return self.dense_experts[k]
        if buffer is None:
            buffer = torch.empty(self.out_features, self.in_features, dtype=self.values.dtype)
        return unpack_expert_into(
            self.values, self.mask[k], self.in_features, self.expert_bounds[k], buffer
        ).t()

    def _forward_on_device(self, flat: Tensor, routing: Routing) -> Tensor:
        """No host round trip: grouped GEMM over all experts, or per-token weights for few tokens."""
        tokens = flat.shape[0]
        few_tokens = tokens < self.num_experts
        if self.dense_experts is not None:
            grouped = routing.grouped(flat)
            if grouped_mm_usable(grouped, self.dense_experts):  # reads only the used experts' weights
                return self._scatter_back(grouped_matmul(grouped, self.dense_experts, routing), routing)
            if few_tokens:
                return per_token_matmul(flat, self.dense_experts.index_select(0, routing.assignment))
            return self._scatter_back(padded_matmul(grouped, self.dense_experts, routing), routing)
        positions = self.out_features * self.in_features
        if few_tokens and gather_unpack_bytes(tokens, positions) <= device_unpack_bytes(
            self.num_experts, positions, self.values.element_size()
        ):  # decoding: each token's expert by a device-side gather (T weights, not K), when it allocates less
            starts = self._starts_on(self.values.device)
            unpacked = unpack_experts_at(self.values, self.mask, self.in_features, starts, routing.assignment)
            return per_token_matmul(flat, unpacked.transpose(1, 2))
        weights = unpack_experts(self.values, self.mask, self.in_features, self.expert_bounds).transpose(1, 2)
        grouped = routing.grouped(flat)
        if grouped_mm_usable(grouped, weights):
            return self._scatter_back(grouped_matmul(grouped, weights, routing), routing)
        return self._scatter_back(padded_matmul(grouped, weights, routing), routing)

    def _forward_semi_structured(self, flat: Tensor, routing: Routing, experts: list[Tensor]) -> Tensor:
        """Each used expert's tokens times its semi-structured weight (one host read of the counts).

        Why not grouped GEMM: torch has no grouped kernel for semi-structured
        operands, so the used experts run one sparse matmul each (torch pads each
        group's rows to the kernel's minimum).
        """
        return self._per_used_expert(flat, routing, lambda k, rows: F.linear(rows, experts[k]))

    def store_semi_structured(self, enable: bool = True) -> int:
        """Keep every expert as a semi-structured sparse tensor (2:4 experts, CUDA); returns their bytes.

        ``enable=False`` drops them (the packed experts stay, as always). Raises
        ``ValueError`` naming the problem when the layer cannot: not on a CUDA GPU
        of compute capability 8.0+, not float16/bfloat16, a shape torch's kernels
        do not take, or experts that are not 2:4.
        """
        self.semi_structured_experts = None
        if not enable:
            return 0
        problem = semi_structured_problem(
            self.values.device, self.values.dtype, self.out_features, self.in_features
        )
        if problem is not None:
            raise ValueError(f"cannot store semi-structured experts: {problem}")
        if not is_two_four(unpack_mask(self.mask, self.in_features)):
            raise ValueError(
                "cannot store semi-structured experts: they are not 2:4 sparse (some group of 4 inputs "
                "keeps more than 2); compress with mask_structure: '2:4' to get such experts"
            )
        weights = unpack_experts(self.values, self.mask, self.in_features, self.expert_bounds)
        experts = [to_semi_structured(weights[k]) for k in range(self.num_experts)]
        self.semi_structured_experts = experts
        return sum(semi_structured_bytes(w) for w in experts)

    @staticmethod
    def _scatter_back(result: Tensor, routing: Routing) -> Tensor:
        """Rows in expert order back to token order."""
        return torch.empty_like(result).index_copy_(0, routing.order, result)

    def stored_bytes(self) -> int:
        """Bytes of the packed experts, bias and own router."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        router = sum(t.numel() * t.element_size() for t in self.router.buffers()) if self.router else 0
        return packed_bytes(self.values, self.mask, self.nnz) + bias + router

    def materialize(self, enable: bool = True, experts: Tensor | None = None) -> int:
        """Keep dense copies of all experts (``enable``) or drop them; returns their bytes.

        ``experts [K, out, in]``: the dense pruned weights this layer was packed from, when
        the caller still has them (the modifier does), so nothing is unpacked.
        """
        self.dense_experts = None
        if not enable:
            return 0
        # stored [K, in, out]: ``x @ W_k^T`` is then a plain (non-transposed) GEMM, which measured
        # faster for the per-expert row blocks than the transposed layout on CPU
        if experts is not None:
            expected = (self.num_experts, self.out_features, self.in_features)
            if tuple(experts.shape) != expected:
                raise ValueError(f"experts must be {list(expected)}, got {list(experts.shape)}")
            dense = experts.detach().to(device=self.values.device, dtype=self.values.dtype)
            self.dense_experts = dense.transpose(1, 2).contiguous()
        else:
            unpacked = unpack_experts(self.values, self.mask, self.in_features, self.expert_bounds)
            self.dense_experts = unpacked.transpose(1, 2).contiguous()
        return self.dense_experts.numel() * self.dense_experts.element_size()

    def extra_repr(self) -> str:
        dense = self.num_experts * self.in_features * self.out_features
        density = self.values.numel() / dense if dense else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, density={density:.3f}, bias={self.bias is not None}, "
            f"routing={'own input' if self.router is not None else 'MLP block'}"
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


def store_experts_semi_structured(model: nn.Module, enable: bool = True) -> int:
    """Keep (or drop) every expert of a 2:4-expanded model on CUDA as a semi-structured sparse tensor.

    Why: the sparse tensor cores multiply these directly, at about the packed
    bytes, where the packed forward unpacks each call's experts to dense first.
    Call after the model is on its GPU in float16/bfloat16 (moving or casting it
    drops them). Returns their bytes; raises ``ValueError`` naming the problem
    when a layer cannot (see :meth:`ExpandedLinear.store_semi_structured`).
    """
    return sum(layer.store_semi_structured(enable) for layer in expanded_linears(model).values())
