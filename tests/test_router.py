"""The folded router against scikit-learn's PCA.transform + KMeans.predict, and its caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from sparse_expansion_plugin.sparse_expansion.clustering import (
    drop_experts,
    fit_router,
    pca_components_for,
    top_components,
)
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter


def clustered_inputs(n: int = 3000, d: int = 64, k: int = 6, seed: int = 0) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    centers = gen.normal(scale=4.0, size=(k, d))
    labels = gen.integers(0, k, size=n)
    return torch.from_numpy(centers[labels] + gen.normal(size=(n, d))).float()


def sklearn_assignment(x: np.ndarray, components: int, k: int, seed: int) -> tuple[np.ndarray, PCA, KMeans]:
    pca = PCA(n_components=components, svd_solver="full", random_state=seed).fit(x)
    kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(pca.transform(x))
    return kmeans.predict(pca.transform(x)), pca, kmeans


def test_folded_router_equals_sklearn_pca_kmeans_on_clear_margins():
    x = torch.randn(2000, 48, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 48)
    x64 = x.double().numpy()
    labels, pca, kmeans = sklearn_assignment(x64, 6, 8, seed=0)
    router = ExpertRouter.from_pca_kmeans(
        torch.from_numpy(pca.mean_),
        torch.from_numpy(pca.components_),
        torch.from_numpy(kmeans.cluster_centers_),
    )
    routed = router(x).assignment.numpy()
    # Reference distances in float64; tokens almost equidistant from two centroids may
    # legitimately flip in float32, so require equality where the margin is clear.
    dist = ((pca.transform(x64)[:, None, :] - kmeans.cluster_centers_[None]) ** 2).sum(-1)
    two = np.sort(dist, axis=1)[:, :2]
    clear = (two[:, 1] - two[:, 0]) > 1e-3 * (1 + two[:, 0])
    assert clear.mean() > 0.98
    np.testing.assert_array_equal(routed[clear], labels[clear])
    assert (routed == labels).mean() > 0.99


def test_fit_router_matches_sklearn_and_is_reproducible():
    x = clustered_inputs()
    fitted = fit_router(x, num_experts=6, pca_components=4, seed=3)
    labels, _, _ = sklearn_assignment(x.double().numpy(), 4, 6, seed=3)
    # Cluster ids may be permuted only if sklearn solved differently; same seed and data -> same ids.
    agree = (fitted.assignment.numpy() == labels).mean()
    assert agree > 0.999
    again = fit_router(x, num_experts=6, pca_components=4, seed=3)
    assert torch.equal(fitted.router.weight, again.router.weight)
    assert torch.equal(fitted.assignment, again.assignment)


def test_router_keeps_no_state_between_calls():
    router = ExpertRouter.from_pca_kmeans(torch.zeros(8), torch.eye(8)[:2], torch.randn(3, 2))
    x = torch.randn(5, 7, 8)
    first = router(x)
    x.mul_(-1)
    recomputed = router(x)  # a changed input is routed afresh: nothing is cached on the router
    assert not torch.equal(first.assignment, recomputed.assignment)
    tensors = [v for v in vars(router).values() if isinstance(v, torch.Tensor)]
    assert tensors == [] and set(dict(router.named_buffers())) == {"weight", "bias"}
    ref = (
        ((x.reshape(-1, 8)[:, :2, None] - router_centroids(router)[None].transpose(1, 2)) ** 2)
        .sum(1)
        .argmin(1)
    )
    assert torch.equal(recomputed.assignment, ref)
    assert int(recomputed.counts.sum()) == 35 and recomputed.host_counts == recomputed.counts.tolist()
    assert torch.equal(
        recomputed.assignment[recomputed.order], recomputed.assignment.sort(stable=True).values
    )


def router_centroids(router: ExpertRouter) -> torch.Tensor:
    """Centroids back from W = 2 C P with P = first two unit vectors (the test's PCA)."""
    return router.weight[:, :2] / 2


def test_router_stays_float32_when_model_is_cast():
    router = ExpertRouter.from_pca_kmeans(
        torch.randn(8), torch.linalg.qr(torch.randn(8, 3))[0].t(), torch.randn(4, 3)
    )
    weight = router.weight.clone()
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), router).to(torch.bfloat16)
    assert module[0].weight.dtype == torch.bfloat16
    assert router.weight.dtype == torch.float32
    assert torch.equal(router.weight, weight)


def test_drop_experts_reassigns_to_nearest_remaining_centroid():
    x = clustered_inputs(n=500, d=16, k=4, seed=2)
    fitted = fit_router(x, num_experts=4, pca_components=3, seed=0)
    merged = drop_experts(fitted, x, [1])
    assert merged.router.num_experts == 3
    centers = torch.from_numpy(fitted.kmeans.cluster_centers_)
    z = fitted.transform(x)
    dist = torch.cdist(z, centers[[0, 2, 3]])
    assert (merged.assignment == dist.argmin(1)).float().mean() > 0.99


def test_top_components_match_sklearn_pca_up_to_sign():
    # distinct variances, so each component is identifiable (sklearn's would be arbitrary otherwise)
    x = torch.randn(1500, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x * torch.linspace(0.1, 4, 40, dtype=torch.float64) + 3.0
    mean, components = top_components(x, 6, seed=0)
    pca = PCA(n_components=6, svd_solver="full").fit(x.numpy())
    np.testing.assert_allclose(mean.numpy(), pca.mean_, atol=1e-10)
    overlap = (components @ torch.from_numpy(pca.components_).t()).abs()
    torch.testing.assert_close(overlap, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_bad_router_inputs():
    with pytest.raises(ValueError, match="exceeds the 3 calibration tokens"):
        fit_router(torch.randn(3, 8), num_experts=4, pca_components=2)
    with pytest.raises(ValueError, match="pca_components"):
        pca_components_for(8, 32, 9)
    assert pca_components_for(576, 32, None) == 18
    assert pca_components_for(16, 32, None) == 1


def test_routing_groups_match_numpy():
    """Counts, group bounds and the expert of each grouped row, against numpy on the same assignment."""
    from sparse_expansion_plugin.sparse_expansion.router import Routing

    assignment = torch.tensor([3, 0, 3, 5, 0, 3, 1, 5, 3])  # experts 2 and 4 empty
    routing = Routing.from_assignment(assignment, 6)
    counts = np.bincount(assignment.numpy(), minlength=6)
    np.testing.assert_array_equal(routing.counts.numpy(), counts)
    assert routing.host_counts == counts.tolist()
    np.testing.assert_array_equal(routing.group_ends.numpy(), np.cumsum(counts))
    assert routing.group_ends.dtype == torch.int32  # grouped GEMM's offsets type
    np.testing.assert_array_equal(routing.group_starts.numpy(), np.cumsum(counts) - counts)
    order = np.argsort(assignment.numpy(), kind="stable")
    np.testing.assert_array_equal(routing.order.numpy(), order)
    np.testing.assert_array_equal(routing.sorted_assignment.numpy(), assignment.numpy()[order])
