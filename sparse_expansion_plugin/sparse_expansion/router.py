"""The Sparse Expansion router: PCA then nearest centroid, folded into one affine map and an argmax.

Why folded: ``argmin_k ||P(x - mu) - c_k||^2`` equals
``argmax_k (2 c_k^T P x - 2 c_k^T P mu - ||c_k||^2)`` (the ``||P(x-mu)||^2`` term
is the same for every k), so inference needs one ``[K, d]`` matmul and no PCA.

One router serves a whole MLP block: gate and up receive the *same* input
tensor, so the assignment computed for the first of them is cached (keyed by
tensor identity and version) and reused by the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor


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


@dataclass
class Routing:
    """Assignment of ``T`` tokens to experts, with the grouping every expert layer needs.

    assignment: ``[T]`` int64 expert index per token.
    order: ``[T]`` token indices sorted by expert (stable), so expert k's tokens are
        ``order[offsets[k]:offsets[k+1]]``.
    counts: tokens per expert (Python ints, length K).
    """

    assignment: Tensor
    order: Tensor
    counts: list[int]
    grouped_input: Tensor | None = None  # the routed input's rows in ``order``, shared by gate and up


class ExpertRouter(nn.Module):
    """Routes each token (a row of the input) to one of ``num_experts`` experts.

    Buffers: ``weight [K, d]`` and ``bias [K]``, kept in float32 whatever the
    model's dtype (a bf16 router would move tokens across cluster borders).
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.register_buffer("weight", torch.zeros(num_experts, in_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self._cache: tuple[Tensor, int, Routing] | None = None

    @classmethod
    def from_pca_kmeans(cls, mean: Tensor, components: Tensor, centroids: Tensor) -> ExpertRouter:
        """A router equal to ``KMeans.predict(PCA.transform(x))``; shapes as :func:`fold_pca_kmeans`."""
        weight, bias = fold_pca_kmeans(mean, components, centroids)
        router = cls(weight.shape[1], weight.shape[0])
        router.weight.copy_(weight.float())
        router.bias.copy_(bias.float())
        return router

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.to(bfloat16) casts floating buffers: keep ours in float32, only move them.
        weight, bias = self.weight, self.bias
        super()._apply(fn, recurse)
        self.weight = weight.to(device=self.weight.device, dtype=torch.float32)
        self.bias = bias.to(device=self.bias.device, dtype=torch.float32)
        self._cache = None
        return self

    def scores(self, x: Tensor) -> Tensor:
        """Cluster scores ``[T, K]`` of ``x [..., d]`` (higher is nearer)."""
        flat = x.reshape(-1, self.in_features).to(self.weight.dtype)
        return torch.addmm(self.bias, flat, self.weight.t())

    def forward(self, x: Tensor) -> Routing:
        """Routing of the tokens of ``x [..., d]``; reused if called again with the same tensor."""
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == x._version:
            return cache[2]
        if self.num_experts == 1:
            tokens = x.numel() // self.in_features
            assignment = torch.zeros(tokens, dtype=torch.long, device=x.device)
            routing = Routing(assignment, torch.arange(tokens, device=x.device), [tokens])
        else:
            assignment = self.scores(x).argmax(dim=1)
            order = torch.argsort(assignment, stable=True)
            counts = torch.bincount(assignment, minlength=self.num_experts).tolist()
            routing = Routing(assignment, order, counts)
        self._cache = (x, x._version, routing)
        return routing

    @property
    def last_routing(self) -> Routing:
        """The routing computed by the latest call (the down projection reuses it when configured)."""
        if self._cache is None:
            raise RuntimeError("router has not routed anything yet: call it on the MLP input first")
        return self._cache[2]

    def clear_cache(self) -> None:
        """Drop the cached input (it holds a reference to the last activation)."""
        self._cache = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}"
