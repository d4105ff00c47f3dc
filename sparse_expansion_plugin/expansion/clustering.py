"""Fit a Sparse Expansion router on one layer's calibration inputs: PCA then k-means (scikit-learn).

Why scikit-learn: PCA with ``svd_solver="covariance_eigh"`` (one ``d x d``
eigendecomposition, fast when tokens >> d) and seeded k-means are small next
to the SparseGPT solves, so there is no need for our own. The returned
assignment is the *folded router's* (float32, as at inference), so every
expert is calibrated on exactly the tokens it will serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from torch import Tensor

from sparse_expansion_plugin.modeling.router import ExpertRouter

logger = logging.getLogger(__name__)


@dataclass
class FittedRouter:
    """A router and what fitting it found: ``assignment [N]`` of the calibration tokens."""

    router: ExpertRouter
    assignment: Tensor
    pca: PCA | None
    kmeans: KMeans | None

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
        return FittedRouter(router, torch.zeros(num_tokens, dtype=torch.long), None, None)
    data = inputs.detach().to(device="cpu", dtype=torch.float32)
    fit_data = data
    if max_fit_tokens is not None and num_tokens > max_fit_tokens:
        pick = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:max_fit_tokens]
        fit_data = data[pick.sort().values]
    x = fit_data.numpy().astype(np.float64)
    pca = PCA(n_components=pca_components, svd_solver="covariance_eigh", random_state=seed).fit(x)
    kmeans = KMeans(
        n_clusters=num_experts, n_init=kmeans_n_init, max_iter=kmeans_max_iter, random_state=seed
    ).fit(pca.transform(x))
    router = ExpertRouter.from_pca_kmeans(
        torch.from_numpy(pca.mean_),
        torch.from_numpy(pca.components_),
        torch.from_numpy(kmeans.cluster_centers_),
    )
    assignment = router.scores(data).argmax(dim=1)
    return FittedRouter(router, assignment, pca, kmeans)


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
    return FittedRouter(router, assignment, fitted.pca, fitted.kmeans)
