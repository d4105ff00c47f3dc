"""The Sparse Expansion router: PCA then nearest centroid, folded into one affine map and an argmax.

Why folded: ``argmin_k ||P(x - mu) - c_k||^2`` equals
``argmax_k (2 c_k^T P x - 2 c_k^T P mu - ||c_k||^2)`` (the ``||P(x-mu)||^2`` term
is the same for every k), so inference needs one ``[K, d]`` matmul and no PCA.
With ``input_norm="l2"`` the clusters were fitted on unit-norm tokens, so each
token is divided by its norm before the same map (a few tokens with huge
activations then cannot pull every centroid toward themselves).

A router is called once per MLP call (see ``block.py``) and returns a
:class:`Routing` that the expert layers of that call receive explicitly; it
keeps no state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

InputNorm = Literal["none", "l2"]
INPUT_NORMS: tuple[str, ...] = ("none", "l2")


def fold_pca_kmeans(mean: Tensor, components: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``PCA(mean [d], components [r, d])`` + ``KMeans(centroids [K, r])`` into ``(W [K, d], b [K])``.

    ``argmax(x @ W.T + b)`` is the k-means cluster of ``PCA.transform(x)``
    (non-whitened PCA, as scikit-learn's default). Computed in float64.
    """
    mean, components, centroids = (t.detach().to(torch.float64) for t in (mean, components, centroids))
    projected = centroids @ components  # [K, d]: c_k^T P
    weight = 2.0 * projected
    bias = -2.0 * projected @ mean - (centroids**2).sum(dim=1)
    return weight, bias


def normalized_tokens(x: Tensor, input_norm: str) -> Tensor:
    """Rows of ``x [T, d]`` as the router sees them: unchanged, or divided by their L2 norm."""
    if input_norm == "none":
        return x
    if input_norm == "l2":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")


@dataclass
class Routing:
    """Assignment of ``T`` tokens to ``K`` experts, and the grouping every expert layer needs.

    assignment: ``[T]`` int64 expert index per token.
    order: ``[T]`` token indices sorted by expert (stable): expert k's tokens are
        ``order[offsets[k]:offsets[k+1]]``.
    counts: ``[K]`` int64 tokens per expert, on the tokens' device. Nothing here
        reads the device back except :attr:`host_counts`, which only a caller
        that wants host ints asks for (the CPU forward).
    source: the routed input itself, so layers fed the same tensor (gate and up)
        gather its rows once (:meth:`grouped`); the routing lives for one MLP call.
    """

    assignment: Tensor
    order: Tensor
    counts: Tensor
    source: Tensor | None = None
    source_version: int = -1
    _grouped: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_assignment(cls, assignment: Tensor, num_experts: int, source: Tensor | None = None) -> Routing:
        """The routing of ``assignment [T]`` (expert indices) over ``num_experts`` experts."""
        if assignment.device.type == "meta":  # shape inference only: no sort or bincount kernels
            counts = torch.zeros(num_experts, dtype=torch.long, device="meta")
            return cls(assignment, torch.empty_like(assignment), counts)
        order = torch.argsort(assignment, stable=True)
        # not torch.bincount: on CUDA it reads the largest index back to the host to size its output
        counts = torch.zeros(num_experts, dtype=torch.long, device=assignment.device)
        counts.scatter_add_(0, assignment, torch.ones_like(assignment))
        version = source._version if source is not None else -1
        return cls(assignment, order, counts, source, version)

    @property
    def num_tokens(self) -> int:
        return int(self.assignment.shape[0])

    @cached_property
    def host_counts(self) -> list[int]:
        """Tokens per expert as Python ints (one device-to-host copy per routing, shared by its layers)."""
        return [int(c) for c in self.counts.tolist()]

    @cached_property
    def group_ends(self) -> Tensor:
        """``[K]`` int32 end of each expert's rows in expert order, on the device (grouped GEMM's ``offs``)."""
        return torch.cumsum(self.counts, 0, dtype=torch.int32)

    @cached_property
    def group_starts(self) -> Tensor:
        """``[K]`` int64 start of each expert's rows in expert order, on the device."""
        return torch.cumsum(self.counts, 0) - self.counts

    @cached_property
    def sorted_assignment(self) -> Tensor:
        """``[T]`` the expert of each row in expert order (``assignment[order]``), on the device."""
        return self.assignment.index_select(0, self.order)

    def grouped(self, flat: Tensor) -> Tensor:
        """Rows of ``flat [T, d]`` in expert order; computed once for the routed input itself."""
        source = self.source
        if source is None or source._version != self.source_version or not _same_rows(flat, source):
            return flat.index_select(0, self.order)
        if self._grouped is None or self._grouped.dtype != flat.dtype:
            self._grouped = flat.index_select(0, self.order)
        return self._grouped


def _same_rows(flat: Tensor, source: Tensor) -> bool:
    """Whether ``flat`` is a ``[T, d]`` view of the very storage of ``source`` (gate and up reshape it)."""
    return (
        flat.data_ptr() == source.data_ptr()
        and flat.shape[-1] == source.shape[-1]
        and flat.numel() == source.numel()
        and flat.dtype == source.dtype
        and flat.is_contiguous()
        and source.is_contiguous()
    )


class ExpertRouter(nn.Module):
    """Routes each token (a row of the input) to one of ``num_experts`` experts.

    Buffers: ``weight [K, d]`` and ``bias [K]``, kept in float32 whatever the
    model's dtype (a bf16 router would move tokens across cluster borders).
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, in_features: int, num_experts: int, input_norm: str = "none") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if in_features < 1 or num_experts < 1:
            raise ValueError(
                f"a router needs in_features >= 1 and num_experts >= 1, got {in_features}, {num_experts}"
            )
        self.in_features = in_features
        self.num_experts = num_experts
        self.input_norm = input_norm
        self.register_buffer("weight", torch.zeros(num_experts, in_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))

    @classmethod
    def from_pca_kmeans(
        cls, mean: Tensor, components: Tensor, centroids: Tensor, input_norm: str = "none"
    ) -> ExpertRouter:
        """A router equal to ``KMeans.predict(PCA.transform(norm(x)))``; shapes as :func:`fold_pca_kmeans`."""
        weight, bias = fold_pca_kmeans(mean, components, centroids)
        router = cls(weight.shape[1], weight.shape[0], input_norm=input_norm)
        router.weight.copy_(weight.float())
        router.bias.copy_(bias.float())
        return router

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.to(bfloat16) casts floating buffers: keep ours in float32, only move them.
        weight, bias = self.weight, self.bias
        super()._apply(fn, recurse)
        self.weight = weight.to(device=self.weight.device, dtype=torch.float32)
        self.bias = bias.to(device=self.bias.device, dtype=torch.float32)
        return self

    def scores(self, x: Tensor) -> Tensor:
        """Cluster scores ``[T, K]`` of ``x [..., d]`` (higher is nearer)."""
        flat = x.reshape(-1, self.in_features).to(device=self.weight.device, dtype=self.weight.dtype)
        flat = normalized_tokens(flat, self.input_norm)
        return torch.addmm(self.bias, flat, self.weight.t())

    def forward(self, x: Tensor) -> Routing:
        """Routing of the tokens of ``x [..., d]``."""
        tokens = x.numel() // self.in_features
        if self.num_experts == 1 or tokens == 0:
            assignment = torch.zeros(tokens, dtype=torch.long, device=x.device)
        else:
            assignment = self.scores(x).argmax(dim=1).to(x.device)
        return Routing.from_assignment(assignment, self.num_experts, source=x)

    def extra_repr(self) -> str:
        norm = f", input_norm={self.input_norm}" if self.input_norm != "none" else ""
        return f"in_features={self.in_features}, num_experts={self.num_experts}{norm}"
