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

Why the fit options: small language models have a few tokens with activations
hundreds of times larger than the rest (SmolLM2's first token: norm ~3,100 against
a median of 5.7 at a down projection). On raw inputs they own PCA's top components
and k-means spends its centroids on them, leaving one cluster with nearly every
other token. ``input_norm="l2"`` fits (and routes) unit-norm tokens, so a token
counts by its direction; ``fit_outlier_quantile`` leaves the largest tokens out
of the fit (they are still routed).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.router import INPUT_NORMS, ExpertRouter, normalized_tokens

logger = logging.getLogger(__name__)


@dataclass
class FittedRouter:
    """A router and what fitting it found: ``assignment [N]`` of the calibration tokens.

    fit_tokens: tokens PCA and k-means saw (after ``max_fit_tokens`` and outlier removal);
    outliers_left_out: tokens of the fit sample left out by ``fit_outlier_quantile``.
    """

    router: ExpertRouter
    assignment: Tensor
    mean: Tensor | None  # [d] PCA mean
    components: Tensor | None  # [r, d] PCA components (rows)
    kmeans: KMeans | None
    fit_tokens: int = 0
    outliers_left_out: int = 0

    def transform(self, x: Tensor) -> Tensor:
        """PCA projection ``[N, r]`` (float64) of ``x [N, d]`` after the router's input normalisation."""
        if self.mean is None or self.components is None:
            raise ValueError("this router was fitted without PCA (one expert): there is no projection")
        return (normalized_tokens(x.double(), self.router.input_norm) - self.mean) @ self.components.t()

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
    input_norm: str = "none",
    fit_outlier_quantile: float | None = None,
) -> FittedRouter:
    """Cluster ``inputs [N, d]`` into ``num_experts`` groups and fold PCA + k-means into a router.

    max_fit_tokens: fit PCA/k-means on a seeded random subset of this many tokens
        (the assignment still covers all N tokens); must be >= ``num_experts``.
    input_norm: ``"none"`` (raw tokens) or ``"l2"``: fit on tokens divided by their
        norm; the router then normalises every token the same way at inference.
    fit_outlier_quantile: ``q`` in (0, 1]: leave fit-sample tokens whose (raw) norm
        exceeds the sample's ``q``-quantile out of the fit; they are still routed.
    The returned assignment is the folded router's argmax over all N tokens.
    Raises if there are fewer tokens (or fit tokens) than experts.
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be [tokens, features], got shape {tuple(inputs.shape)}")
    num_tokens, in_features = inputs.shape
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if fit_outlier_quantile is not None and not 0.0 < fit_outlier_quantile <= 1.0:
        raise ValueError(
            f"fit_outlier_quantile must lie in (0, 1] (e.g. 0.99), got {fit_outlier_quantile}; "
            "use None to fit on every token"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts > num_tokens:
        raise ValueError(
            f"num_experts={num_experts} exceeds the {num_tokens} calibration tokens of this layer: "
            "use more calibration samples (or longer ones) or fewer experts"
        )
    if max_fit_tokens is not None and max_fit_tokens < num_experts:
        raise ValueError(
            f"max_fit_tokens={max_fit_tokens} is smaller than num_experts={num_experts}: k-means needs at "
            "least one token per expert; raise max_fit_tokens (thousands per expert is typical) or use None"
        )
    if num_experts == 1:
        router = ExpertRouter(in_features, 1, input_norm=input_norm)
        return FittedRouter(router, torch.zeros(num_tokens, dtype=torch.long), None, None, None)
    data = inputs.detach().to(device="cpu", dtype=torch.float32)
    fit_data = data
    if max_fit_tokens is not None and num_tokens > max_fit_tokens:
        pick = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:max_fit_tokens]
        fit_data = data[pick.sort().values]
    left_out = 0
    if fit_outlier_quantile is not None and fit_outlier_quantile < 1.0:
        norms = fit_data.double().norm(dim=1)
        # numpy, not torch.quantile: the latter refuses inputs over 16M elements
        keep = norms <= float(np.quantile(norms.numpy(), fit_outlier_quantile))
        left_out = int((~keep).sum())
        fit_data = fit_data[keep]
        if fit_data.shape[0] < num_experts:
            raise ValueError(
                f"fit_outlier_quantile={fit_outlier_quantile} leaves {fit_data.shape[0]} fit tokens for "
                f"num_experts={num_experts}: raise the quantile or the number of fit tokens"
            )
    fit_data = normalized_tokens(fit_data, input_norm)
    mean, components = top_components(fit_data, pca_components, seed)
    projected = ((fit_data.double() - mean) @ components.t()).numpy()
    kmeans = KMeans(
        n_clusters=num_experts, n_init=kmeans_n_init, max_iter=kmeans_max_iter, random_state=seed
    ).fit(projected)
    router = ExpertRouter.from_pca_kmeans(
        mean, components, torch.from_numpy(kmeans.cluster_centers_), input_norm=input_norm
    )
    assignment = router.scores(data).argmax(dim=1)
    return FittedRouter(router, assignment, mean, components, kmeans, fit_data.shape[0], left_out)


def drop_experts(fitted: FittedRouter, inputs: Tensor, drop: list[int]) -> FittedRouter:
    """Remove experts ``drop`` from the router and re-assign all tokens ``inputs [N, d]``.

    Used by the ``merge`` small-cluster rule: a dropped cluster's tokens go to
    their nearest remaining centroid (removing rows of the folded map is
    exactly removing centroids).
    """
    keep = [k for k in range(fitted.router.num_experts) if k not in set(drop)]
    if not keep:
        raise ValueError("cannot drop every expert")
    router = ExpertRouter(fitted.router.in_features, len(keep), input_norm=fitted.router.input_norm)
    router.weight.copy_(fitted.router.weight[keep])
    router.bias.copy_(fitted.router.bias[keep])
    assignment = router.scores(inputs.to(torch.float32)).argmax(dim=1)
    return FittedRouter(
        router,
        assignment,
        fitted.mean,
        fitted.components,
        fitted.kmeans,
        fitted.fit_tokens,
        fitted.outliers_left_out,
    )


def cluster_size_summary(counts: Sequence[int] | Tensor) -> str:
    """One log line for tokens per expert: ``"min 12 / median 340 / max 1,781 of 8,192 tokens"``.

    Why: a collapse (one expert holding nearly every token, the others a handful)
    is invisible in a perplexity but plain in these three numbers.
    """
    values = [int(c) for c in (counts.reshape(-1).tolist() if isinstance(counts, Tensor) else counts)]
    if not values:
        raise ValueError("cluster_size_summary needs the token count of at least one expert, got none")
    if min(values) < 0:
        raise ValueError(f"token counts cannot be negative, got {values}")
    median = statistics.median(values)
    shown = f"{int(median):,}" if float(median).is_integer() else f"{median:,.1f}"
    return f"min {min(values):,} / median {shown} / max {max(values):,} of {sum(values):,} tokens"
