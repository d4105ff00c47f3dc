"""Streaming per-cluster Hessians and the count-based prior, against slow float64 references.

References: per-cluster ``sum x x^T`` by plain loops over tokens in float64 (numpy),
batch rows counted by hand, stock llm-compressor's ``accumulate_hessian`` for one
expert, and the prior ``(n_k H_k + tau H) / (n_k + tau)`` written out in numpy.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian as stock_accumulate

from sparse_expansion_plugin.sparse_expansion.hessians import (
    ClusterHessians,
    StreamingClusterHessians,
    cluster_hessians,
    regularized_hessians,
)

DIM = 7


def ragged_batches(num_experts: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batches of different sizes, 3-D and 2-D; expert ``num_experts - 2`` never receives a token."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 13, DIM), (40, DIM), (1, 5, DIM), (3, 9, DIM), (1, DIM), (4, 2, DIM)]
    used = [k for k in range(num_experts) if k != num_experts - 2]
    batches, assignments = [], []
    for shape in shapes:
        batch = torch.randn(*shape, generator=gen) * 3 + 1
        tokens = batch.numel() // DIM
        pick = torch.randint(0, len(used), (tokens,), generator=gen)
        batches.append(batch)
        assignments.append(torch.tensor(used)[pick])
    return batches, assignments


def loop_reference(
    batches: list[torch.Tensor], assignments: list[torch.Tensor], num_experts: int
) -> tuple[np.ndarray, list[int], list[int], np.ndarray, int, int]:
    """``2/N_k sum x x^T`` per cluster by loops over every token in float64; N_k = batch rows holding k."""
    gram = np.zeros((num_experts, DIM, DIM))
    samples = [0] * num_experts
    tokens = [0] * num_experts
    global_samples = 0
    for batch, assignment in zip(batches, assignments, strict=True):
        rows = batch.double().numpy().reshape(-1 if batch.dim() == 3 else 1, *batch.shape[-2:])
        labels = assignment.numpy().reshape(rows.shape[0], rows.shape[1])
        global_samples += rows.shape[0]
        for row, row_labels in zip(rows, labels, strict=True):
            for k in set(row_labels.tolist()):
                samples[k] += 1
            for x, k in zip(row, row_labels, strict=True):
                gram[k] += np.outer(x, x)
                tokens[k] += 1
    hessians = np.stack([2.0 / s * g if s else g for g, s in zip(gram, samples, strict=True)])
    global_h = 2.0 / global_samples * gram.sum(axis=0)
    return hessians, samples, tokens, global_h, global_samples, sum(tokens)


def assert_relative(got: torch.Tensor, expected: np.ndarray, rel: float = 1e-5) -> None:
    got64 = got.double().numpy()
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(got64, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("entry", ["streaming", "wrapper"])
def test_cluster_hessians_equal_loop_reference(entry):
    num_experts = 5
    batches, assignments = ragged_batches(num_experts)
    if entry == "streaming":
        stream = StreamingClusterHessians(num_experts, DIM)
        for batch, assignment in zip(batches, assignments, strict=True):
            stream.add(batch, assignment)
        stats = stream.result()
    else:
        stats = cluster_hessians(batches, assignments, num_experts)
    hessians, samples, tokens, global_h, global_samples, global_tokens = loop_reference(
        batches, assignments, num_experts
    )
    assert stats.tokens == tokens and stats.tokens[num_experts - 2] == 0
    assert stats.samples == samples and stats.samples[num_experts - 2] == 0
    assert (stats.global_samples, stats.global_tokens) == (global_samples, global_tokens)
    assert stats.hessians.dtype == torch.float32
    for k in range(num_experts):
        assert_relative(stats.hessians[k], hessians[k])
    assert not stats.hessians[num_experts - 2].any()  # empty cluster: nothing accumulated
    assert_relative(stats.global_hessian, global_h)


def test_samples_count_batch_rows_holding_the_cluster():
    # row 0 holds only expert 0, row 1 both, row 2 only expert 1: N_0 = 2, N_1 = 2, layer N = 3
    batch = torch.randn(3, 4, DIM, generator=torch.Generator().manual_seed(1))
    assignment = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    stats = cluster_hessians([batch], [assignment], 2)
    assert stats.samples == [2, 2] and stats.global_samples == 3 and stats.tokens == [6, 6]


@pytest.mark.parametrize("entry", ["streaming", "wrapper"])
def test_one_expert_is_stock_llmcompressor_bit_for_bit(entry):
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 11, DIM, generator=gen), torch.randn(17, DIM, generator=gen)]
    batches.append(torch.randn(3, 5, DIM, generator=gen).to(torch.bfloat16))
    linear = torch.nn.Linear(DIM, 3)
    stock = torch.zeros(DIM, DIM, dtype=torch.float32)
    count = 0
    for batch in batches:
        stock, count = stock_accumulate(batch, linear, stock, count)
    assignments = [torch.zeros(b.numel() // DIM, dtype=torch.long) for b in batches]
    if entry == "streaming":
        stream = StreamingClusterHessians(1, DIM)
        for batch in batches:
            stream.add(batch)  # one expert: the assignment may be left out
        stats = stream.result()
    else:
        stats = cluster_hessians(batches, assignments, 1)
    assert torch.equal(stats.hessians[0], stock)
    assert torch.equal(stats.global_hessian, stock)
    assert stats.samples == [count] and stats.global_samples == count == 6
    assert stats.tokens == [22 + 17 + 15]


def test_streaming_memory_does_not_grow_with_tokens_or_keep_inputs():
    stream = StreamingClusterHessians(4, DIM)

    def held_bytes() -> int:
        return sum(t.numel() * t.element_size() for t in vars(stream).values() if isinstance(t, torch.Tensor))

    batch = torch.randn(2, 50, DIM)
    stream.add(batch, torch.arange(100) % 4)
    after_one = held_bytes()
    alive = weakref.ref(batch)
    del batch
    gc.collect()
    assert alive() is None  # the captured batch is not kept
    for _ in range(30):
        stream.add(torch.randn(8, 64, DIM), torch.randint(0, 4, (512,)))
    assert held_bytes() == after_one <= 4 * DIM * DIM * 4 + 1024
    assert stream.result().global_tokens == 100 + 30 * 512


def test_result_can_be_taken_midway_and_accumulation_continues():
    batches, assignments = ragged_batches(4, seed=3)
    stream = StreamingClusterHessians(4, DIM)
    for batch, assignment in zip(batches[:3], assignments[:3], strict=True):
        stream.add(batch, assignment)
    first = stream.result()
    assert_relative(first.hessians[0], loop_reference(batches[:3], assignments[:3], 4)[0][0])
    for batch, assignment in zip(batches[3:], assignments[3:], strict=True):
        stream.add(batch, assignment)
    assert_relative(stream.result().hessians[1], loop_reference(batches, assignments, 4)[0][1])


def test_bad_streaming_input():
    stream = StreamingClusterHessians(3, DIM)
    with pytest.raises(ValueError, match=r"inputs must be \[batch, seq, 7\]"):
        stream.add(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="5 assignments for 4 tokens"):
        stream.add(torch.randn(4, DIM), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 3\): min 0, max 3"):
        stream.add(torch.randn(2, DIM), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer expert indices"):
        stream.add(torch.randn(2, DIM), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="assignment is required with 3 experts"):
        stream.add(torch.randn(2, DIM))
    assert stream.result().global_tokens == 0  # nothing half-added by a rejected batch
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        StreamingClusterHessians(0, DIM)
    with pytest.raises(ValueError, match="2 input batches but 1 assignments"):
        cluster_hessians([torch.randn(2, DIM)] * 2, [torch.zeros(2, dtype=torch.long)], 3)


# --- the count-based prior -------------------------------------------------------------


def prior_case() -> tuple[ClusterHessians, np.ndarray, np.ndarray]:
    """Clusters of 0, 3, 40, 6000 and 6000 tokens with different covariances; returns stats, X, labels."""
    gen = np.random.default_rng(5)
    sizes = [0, 3, 40, 6000, 6000]
    xs, labels = [], []
    for k, size in enumerate(sizes):
        scale = np.linspace(0.5, 2.0, DIM) * (k + 1)
        xs.append(gen.normal(size=(size, DIM)) * scale + k)
        labels.append(np.full(size, k))
    x = np.concatenate(xs)
    label = np.concatenate(labels)
    order = gen.permutation(len(x))
    x, label = x[order], label[order]
    batches = [torch.from_numpy(part).float() for part in np.array_split(x, 7)]
    assignments = [torch.from_numpy(part) for part in np.array_split(label, 7)]
    return cluster_hessians(batches, assignments, len(sizes)), x, label


def hand_prior(x: np.ndarray, label: np.ndarray, k: int, tau: float) -> np.ndarray:
    xr = x.astype(np.float32).astype(np.float64)  # the float32 inputs the code sees
    layer = xr.T @ xr / len(xr)
    own = xr[label == k]
    n_k = len(own)
    own_mean = own.T @ own / n_k if n_k else np.zeros_like(layer)
    return (n_k * own_mean + tau * layer) / (n_k + tau)


@pytest.mark.parametrize("tau", [0.5, 25.0, 1000.0])
def test_prior_matches_hand_formula(tau):
    stats, x, label = prior_case()
    out, notes = regularized_hessians(stats, prior_tokens=tau)
    for k in range(5):
        assert_relative(out[k], hand_prior(x, label, k, tau))
    assert notes == ["expert 0: no calibration tokens, using the global Hessian"]


def test_prior_limits_empty_cluster_is_layer_and_large_cluster_is_own():
    stats, x, label = prior_case()
    tau = 10.0
    out, _ = regularized_hessians(stats, prior_tokens=tau)
    xr = x.astype(np.float32).astype(np.float64)
    layer = xr.T @ xr / len(xr)
    assert torch.equal(out[0], stats.per_token())  # n_k = 0: exactly the layer's Hessian
    assert_relative(out[0], layer)
    big = xr[label == 3]
    own = big.T @ big / len(big)
    # n_k = 6000 >> tau: within tau / (n_k + tau) of its own Hessian, far from the layer's
    gap = np.abs(out[3].double().numpy() - own).max()
    assert gap <= tau / (6000 + tau) * np.abs(layer - own).max() + 1e-5 * np.abs(own).max()
    assert np.abs(layer - own).max() > 100 * gap
    # the 3-token cluster is mostly the layer's
    small = xr[label == 1]
    small_own = small.T @ small / 3
    got = out[1].double().numpy()
    assert np.abs(got - layer).max() < np.abs(got - small_own).max()


def test_prior_zero_is_bit_for_bit_and_one_expert_keeps_stock():
    stats, _, _ = prior_case()
    plain, _ = regularized_hessians(stats)
    zero, _ = regularized_hessians(stats, prior_tokens=0.0)
    assert torch.equal(zero, plain)
    assert torch.equal(zero[1:], stats.hessians[1:])
    one = cluster_hessians([torch.randn(2, 6, DIM)], [torch.zeros(12, dtype=torch.long)], 1)
    out, _ = regularized_hessians(one, prior_tokens=50.0)
    assert torch.equal(out[0], one.hessians[0])


def test_prior_then_dampening_for_small_clusters():
    stats, x, label = prior_case()
    out, notes = regularized_hessians(
        stats,
        prior_tokens=20.0,
        min_cluster_tokens=100,
        small_cluster_rule="dampen",
        small_cluster_dampening=0.1,
    )
    pulled = hand_prior(x, label, 1, 20.0)
    expected = pulled + 0.1 * np.trace(pulled) / DIM * np.eye(DIM)
    assert_relative(out[1], expected)
    assert sum("dampening" in note for note in notes) == 2  # experts 1 and 2; 0 is empty, 3 and 4 are large


def test_bad_prior_arguments():
    stats, _, _ = prior_case()
    with pytest.raises(ValueError, match="prior_tokens .* must be >= 0, got -1"):
        regularized_hessians(stats, prior_tokens=-1.0)
    with pytest.raises(ValueError, match="prior_tokens"):
        regularized_hessians(stats, prior_tokens=float("nan"))
    with pytest.raises(ValueError, match="hessian_shrinkage=0.2 and prior_tokens=5"):
        regularized_hessians(stats, shrinkage=0.2, prior_tokens=5.0)


# --- soft Hessians: each token shared with its second-nearest cluster -------------------


def test_soft_hessians_equal_weighted_loop_reference():
    """Token t adds (1 - s_t) x x^T to its cluster and s_t x x^T to its second one: per-token means
    and weighted counts against a float64 loop; the global Hessian still holds every token once."""
    num_experts = 4
    batches, firsts = ragged_batches(num_experts, seed=5)
    gen = torch.Generator().manual_seed(6)
    seconds = [
        (f + 1 + torch.randint(0, num_experts - 1, f.shape, generator=gen)) % num_experts for f in firsts
    ]
    shares = [torch.rand(f.shape, generator=gen) for f in firsts]
    stream = StreamingClusterHessians(num_experts, DIM)
    for batch, first, second, share in zip(batches, firsts, seconds, shares, strict=True):
        stream.add(batch, first, second, share)
    stats = stream.result()
    gram = np.zeros((num_experts, DIM, DIM))
    weight = np.zeros(num_experts)
    for batch, first, second, share in zip(batches, firsts, seconds, shares, strict=True):
        for x, a, b, s in zip(
            batch.double().reshape(-1, DIM).numpy(), first, second, share.double(), strict=True
        ):
            gram[int(a)] += (1 - float(s)) * np.outer(x, x)
            gram[int(b)] += float(s) * np.outer(x, x)
            weight[int(a)] += 1 - float(s)
            weight[int(b)] += float(s)
    np.testing.assert_allclose(stats.token_weights, weight, rtol=1e-6)
    assert stats.tokens == np.bincount(torch.cat(firsts).numpy(), minlength=num_experts).tolist()
    for k in range(num_experts):
        assert_relative(stats.per_token(k), gram[k] / weight[k])
    assert_relative(stats.per_token(), gram.sum(axis=0) / stats.global_tokens)
    tau = 8.0
    out, _ = regularized_hessians(stats, prior_tokens=tau)
    layer = gram.sum(axis=0) / stats.global_tokens
    for k in range(num_experts):
        if stats.tokens[k]:  # an expert with no routed token takes the layer's Hessian
            assert_relative(out[k], (gram[k] + tau * layer) / (weight[k] + tau))


def test_second_choice_and_share_against_cdist_and_scipy():
    from scipy.special import expit

    from sparse_expansion_plugin.sparse_expansion.hessians import second_choice_shares, soft_share
    from sparse_expansion_plugin.sparse_expansion.router import fold_pca_kmeans

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    mean, comps = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(3, 6, generator=gen, dtype=torch.float64),
    )
    centres = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    weight, bias = fold_pca_kmeans(mean, comps, centres)
    first, second, gap = second_choice_shares(x @ weight.t() + bias)
    squared = (torch.cdist((x - mean) @ comps.t(), centres) ** 2).numpy()
    order = np.argsort(squared, axis=1)
    rows = np.arange(50)
    assert first.tolist() == order[:, 0].tolist() and second.tolist() == order[:, 1].tolist()
    np.testing.assert_allclose(
        gap.numpy(), squared[rows, order[:, 1]] - squared[rows, order[:, 0]], rtol=1e-9
    )
    share = soft_share(gap, median_gap=0.7, scale=0.5)
    np.testing.assert_allclose(share.numpy(), expit(-gap.numpy() / 0.35), rtol=1e-5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        soft_share(gap, median_gap=0.7, scale=0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        second_choice_shares(torch.zeros(4, 1))


def test_bad_soft_hessian_input():
    stream = StreamingClusterHessians(3, DIM)
    x, first = torch.randn(4, DIM), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="both `second` and `second_share`"):
        stream.add(x, first, second=torch.tensor([1, 2, 0, 1]))
    with pytest.raises(ValueError, match=r"second_share must lie in \[0, 1\]"):
        stream.add(x, first, torch.tensor([1, 2, 0, 1]), torch.tensor([0.1, 1.5, 0.0, 0.2]))
    with pytest.raises(ValueError, match="4 floating-point shares"):
        stream.add(x, first, torch.tensor([1, 2, 0, 1]), torch.tensor([1, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        stream.add(x, first, torch.tensor([1, 2, 3, 1]), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="at least two experts"):
        StreamingClusterHessians(1, DIM).add(x, None, torch.zeros(4, dtype=torch.long), torch.zeros(4))
    assert stream.result().global_tokens == 0  # nothing half-added by a rejected batch
