"""Fit a Sparse Expansion router on one layer's calibration inputs: PCA then k-means.

PCA is our own (torch): the top ``r`` eigenvectors of the input covariance by
seeded subspace iteration with a Rayleigh-Ritz step. Why not scikit-learn's
PCA: a full ``d x d`` eigendecomposition (``covariance_eigh``/``full``) took
7-57 s for d = 1536 on the shared 2-core CI machine and its randomized solver
12 s on 32k tokens, while we need only r = d/32 components; subspace iteration
costs one ``X^T X`` plus a few ``d x d x r`` products (same components to float
tolerance, up to sign, which k-means does not see). k-means is scikit-learn's,
seeded. The returned assignment is the *folded router's* (float32, as at
inference), so every expert is calibrated on exactly the tokens it will serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sklearn.cluster import KMeans
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

logger = logging.getLogger(__name__)


@dataclass
class FittedRouter:
    """A router and what fitting it found: ``assignment [N]`` of the calibration tokens."""

    router: ExpertRouter
    assignment: Tensor
    mean: Tensor | None  # [d] PCA mean
    components: Tensor | None  # [r, d] PCA components (rows)
    kmeans: KMeans | None

    def transform(self, x: Tensor) -> Tensor:
        """PCA projection ``[N, r]`` of ``x [N, d]`` (float64), as ``sklearn.PCA.transform``."""
        if self.mean is None or self.components is None:
            raise ValueError("this router was fitted without PCA (one expert): there is no projection")
        return (x.double() - self.mean) @ self.components.t()

    @property
    def counts(self) -> Tensor:
        """Calibration tokens per expert ``[K]``."""
        return torch.bincount(self.assignment, minlength=self.router.num_experts)


def pca_components_for(in_features: int, reduction: int, components: int | None) -> int:
    """PCA size: ``components`` if given, else ``in_features // reduction`` (at least 1)."""
    if components is not None:
        if not 1 <= components <= in_features:
            raise ValueError(f"pca_components must lie in [1, {in_features}], got {components}")
        return components
    if reduction < 1:
        raise ValueError(f"pca_reduction must be >= 1, got {reduction}")
    return max(1, in_features // reduction)


def top_components(
    data: Tensor, num_components: int, seed: int = 0, iterations: int = 16
) -> tuple[Tensor, Tensor]:
    """PCA of ``data [N, d]``: ``(mean [d], components [r, d])`` float64, by seeded subspace iteration.

    Orthogonal iteration on the covariance with ``r + 10`` vectors, then a
    Rayleigh-Ritz step; components are sorted by explained variance.
    """
    mean = data.double().mean(dim=0)
    centred = data - mean.to(data.dtype)
    cov = (centred.t() @ centred).double() / max(data.shape[0] - 1, 1)
    dim = cov.shape[0]
    width = min(dim, num_components + 10)
    basis = torch.randn(dim, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis, _ = torch.linalg.qr(basis)
    for _ in range(iterations if width < dim else 0):
        basis, _ = torch.linalg.qr(cov @ basis)
    values, vectors = torch.linalg.eigh(basis.t() @ cov @ basis)
    order = values.argsort(descending=True)[:num_components]
    components = (basis @ vectors[:, order]).t().contiguous()
    return mean, components


def fit_router(
    inputs: Tensor,
    num_experts: int,
    pca_components: int,
    seed: int = 0,
    kmeans_n_init: int = 1,
    kmeans_max_iter: int = 300,
    max_fit_tokens: int | None = None,
) -> FittedRouter:
    """Cluster ``inputs [N, d]`` into ``num_experts`` groups and fold PCA + k-means into a router.

    ``max_fit_tokens`` fits PCA/k-means on a seeded random subset (the
    assignment still covers all N tokens). Raises if there are fewer tokens
    than experts.
    """
    num_tokens, in_features = inputs.shape
    if num_experts > num_tokens:
        raise ValueError(
            f"num_experts={num_experts} exceeds the {num_tokens} calibration tokens of this layer: "
            "use more calibration samples (or longer ones) or fewer experts"
        )
    if num_experts == 1:
        router = ExpertRouter(in_features, 1)
        return FittedRouter(router, torch.zeros(num_tokens, dtype=torch.long), None, None, None)
    data = inputs.detach().to(device="cpu", dtype=torch.float32)
    fit_data = data
    if max_fit_tokens is not None and num_tokens > max_fit_tokens:
        pick = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:max_fit_tokens]
        fit_data = data[pick.sort().values]
    mean, components = top_components(fit_data, pca_components, seed)
    projected = ((fit_data.double() - mean) @ components.t()).numpy()
    kmeans = KMeans(
        n_clusters=num_experts, n_init=kmeans_n_init, max_iter=kmeans_max_iter, random_state=seed
    ).fit(projected)
    router = ExpertRouter.from_pca_kmeans(mean, components, torch.from_numpy(kmeans.cluster_centers_))
    assignment = router.scores(data).argmax(dim=1)
    return FittedRouter(router, assignment, mean, components, kmeans)


def drop_experts(fitted: FittedRouter, inputs: Tensor, drop: list[int]) -> FittedRouter:
    """Remove experts ``drop`` from the router and re-assign all tokens ``inputs [N, d]``.

    Used by the ``merge`` small-cluster rule: a dropped cluster's tokens go to
    their nearest remaining centroid (removing rows of the folded map is
    exactly removing centroids).
    """
    keep = [k for k in range(fitted.router.num_experts) if k not in set(drop)]
    if not keep:
        raise ValueError("cannot drop every expert")
    router = ExpertRouter(fitted.router.in_features, len(keep))
    router.weight.copy_(fitted.router.weight[keep])
    router.bias.copy_(fitted.router.bias[keep])
    assignment = router.scores(inputs.to(torch.float32)).argmax(dim=1)
    return FittedRouter(router, assignment, fitted.mean, fitted.components, fitted.kmeans)
