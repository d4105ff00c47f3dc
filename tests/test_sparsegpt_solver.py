"""Our SparseGPT solver against llm-compressor's own ``sparsify_weight`` (the reference)."""

from __future__ import annotations

import logging

import pytest
import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
    accumulate_hessian as stock_accumulate_hessian,
)
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
    make_empty_hessian,
    sparsify_weight,
)

from sparse_expansion_plugin.pruning.sparsegpt import accumulate_hessian, sparsegpt_prune


def _calibration(seed: int, n: int = 300, batches: int = 4, dead: int | None = 5) -> torch.Tensor:
    """Inputs [batches, 40, n] with uneven column scales and (optionally) one dead column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches, 40, n, generator=g) * (0.1 + torch.rand(n, generator=g))
    if dead is not None:
        x[..., dead] = 0
    return x


def _stock_hessian(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    h, count = make_empty_hessian(linear), 0
    for b in range(x.shape[0]):
        h, count = stock_accumulate_hessian(x[b : b + 1], linear, h, count)
    return h


def _stock_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity, n=0, m=0, block=128) -> torch.Tensor:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    _, pruned = sparsify_weight(linear, {linear: hessian.clone()}, sparsity, n, m, block, 0.01, False)
    return pruned


def test_accumulate_hessian_matches_stock():
    x = _calibration(0)
    linear = torch.nn.Linear(300, 8)
    h, count = torch.zeros(300, 300), 0
    for b in range(x.shape[0]):
        h, count = accumulate_hessian(x[b : b + 1], h, count)
    ref = _stock_hessian(linear, x)
    assert count == x.shape[0]
    torch.testing.assert_close(h, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("sparsity", "n", "m", "block"),
    [(0.5, 0, 0, 128), (0.7, 0, 0, 128), (0.3, 0, 0, 64), (0.0, 2, 4, 128), (0.0, 4, 8, 128)],
)
def test_float_sparsity_reproduces_stock(sparsity, n, m, block):
    torch.manual_seed(1)
    linear = torch.nn.Linear(300, 48)
    hessian = _stock_hessian(linear, _calibration(1))
    ref = _stock_prune(linear.weight.data, hessian, sparsity, n, m, block)
    ours, keep = sparsegpt_prune(linear.weight.data, hessian, sparsity, n, m, block, 0.01)
    assert torch.equal(keep, ref != 0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_batched_experts_equal_stock_one_at_a_time():
    torch.manual_seed(2)
    experts = 3
    weights = torch.randn(experts, 40, 200)
    hessians = torch.stack(
        [
            _stock_hessian(torch.nn.Linear(200, 40), _calibration(10 + e, n=200, dead=e))
            for e in range(experts)
        ]
    )
    ours, keep = sparsegpt_prune(weights, hessians, 0.6, block_size=64)
    assert ours.shape == keep.shape == (experts, 40, 200)
    for e in range(experts):
        ref = _stock_prune(weights[e], hessians[e], 0.6, block=64)
        assert torch.equal(keep[e], ref != 0)
        torch.testing.assert_close(ours[e], ref, rtol=1e-4, atol=1e-5)


def test_shared_weight_with_expert_hessians_is_batched():
    torch.manual_seed(3)
    weight = torch.randn(16, 64)
    hessians = torch.stack(
        [_stock_hessian(torch.nn.Linear(64, 16), _calibration(20 + e, n=64)) for e in range(2)]
    )
    ours, keep = sparsegpt_prune(weight, hessians, 0.5, prune_n=2, prune_m=4)
    assert ours.shape == (2, 16, 64)
    for e in range(2):
        torch.testing.assert_close(
            ours[e], _stock_prune(weight, hessians[e], 0.5, 2, 4), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_exact(n, m):
    torch.manual_seed(4)
    weight = torch.randn(3, 24, 96)
    hessians = torch.stack(
        [_stock_hessian(torch.nn.Linear(96, 24), _calibration(30 + e, n=96)) for e in range(3)]
    )
    ours, keep = sparsegpt_prune(weight, hessians, prune_n=n, prune_m=m)
    zeros_per_group = (~keep).reshape(3, 24, 96 // m, m).sum(-1)
    assert bool((zeros_per_group == n).all())
    assert bool((ours[~keep] == 0).all())


def test_per_row_fractions_give_exact_row_counts_and_reconstruct():
    torch.manual_seed(5)
    x = _calibration(5, n=256, dead=None)
    weight = torch.randn(32, 256)
    hessian = _stock_hessian(torch.nn.Linear(256, 32), x)
    fractions = torch.linspace(0.2, 0.8, 32)
    ours, keep = sparsegpt_prune(weight, hessian, fractions, block_size=64)
    expected = torch.round(fractions.double() * 256).long()
    assert torch.equal((~keep).sum(1), expected)
    assert torch.equal((ours == 0).sum(1), expected)
    # The OBS update must reconstruct the layer output better than zeroing the same mask.
    flat = x.reshape(-1, 256)
    err_update = ((flat @ (ours - weight).T) ** 2).sum()
    err_zero = ((flat @ (weight * keep - weight).T) ** 2).sum()
    assert err_update < 0.8 * err_zero


def test_per_row_fractions_per_expert():
    torch.manual_seed(6)
    weights = torch.randn(2, 8, 64)
    hessian = _stock_hessian(torch.nn.Linear(64, 8), _calibration(6, n=64, dead=None))
    fractions = torch.rand(2, 8) * 0.9
    _, keep = sparsegpt_prune(weights, hessian, fractions)
    assert torch.equal((~keep).sum(-1), torch.round(fractions.double() * 64).long())


def test_non_positive_definite_expert_is_dampened_not_fatal(caplog):
    torch.manual_seed(7)
    weight = torch.randn(8, 32)
    good = _stock_hessian(torch.nn.Linear(32, 8), _calibration(7, n=32, dead=None))
    bad = -torch.eye(32) * 0.01 + torch.diag(torch.full((32,), 1e-4))
    with caplog.at_level(logging.WARNING):
        ours, keep = sparsegpt_prune(weight, torch.stack([good, bad]), 0.5)
    assert "expert 1" in caplog.text
    torch.testing.assert_close(ours[0], _stock_prune(weight, good, 0.5), rtol=1e-4, atol=1e-5)
    assert bool(torch.isfinite(ours[1]).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"prune_n": 4, "prune_m": 4}, "0 < N < M"),
        ({"prune_n": 2, "prune_m": 0}, "0 < N < M"),
        ({"sparsity": torch.full((8,), 0.5), "prune_n": 2, "prune_m": 4}, "N:M"),
        ({"sparsity": torch.full((7,), 0.5)}, "shape"),
        ({"fixed_pruned": torch.zeros(8, 15, dtype=torch.bool)}, "fixed_pruned is"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(torch.randn(8, 16), torch.eye(16), **kwargs)


def _layer(seed: int, rows: int = 32, n: int = 256):
    torch.manual_seed(seed)
    weight = torch.randn(rows, n)
    return weight, _stock_hessian(torch.nn.Linear(n, rows), _calibration(seed, n=n, dead=None))


def test_unit_row_weight_is_stock_and_heavy_rows_lose_fewer_weights():
    weight, hessian = _layer(8)
    ref = _stock_prune(weight, hessian, 0.6)
    same, keep_same = sparsegpt_prune(weight, hessian, 0.6, row_weight=torch.ones(32))
    assert torch.equal(keep_same, ref != 0)
    heavy = torch.ones(32)
    heavy[:8] = 4.0
    _, keep = sparsegpt_prune(weight, hessian, 0.6, row_weight=heavy)
    zeros_ref, zeros = (ref == 0).sum(1), (~keep).sum(1)
    assert zeros.sum() == zeros_ref.sum()  # same count in every block, so the same total
    assert zeros[:8].sum() < zeros_ref[:8].sum() and zeros[8:].sum() > zeros_ref[8:].sum()


def test_num_zeros_is_exact_per_expert():
    weight, hessian = _layer(9)
    targets = torch.tensor([0, 1, 4000, 8191])
    _, keep = sparsegpt_prune(weight.expand(4, -1, -1), hessian, num_zeros=targets, block_size=100)
    assert torch.equal((~keep).reshape(4, -1).sum(1), targets)


def test_column_weight_steers_nm_choice_and_keeps_pattern():
    weight, hessian = _layer(10, n=64)
    protect = torch.ones(64)
    protect[::4] = 1e6  # the first column of every group of 4 is made precious
    _, keep = sparsegpt_prune(weight, hessian, prune_n=2, prune_m=4, column_weight=protect)
    assert bool(((~keep).reshape(32, 16, 4).sum(-1) == 2).all())
    assert bool(keep[:, ::4].all())
    _, keep_ref = sparsegpt_prune(weight, hessian, prune_n=2, prune_m=4)
    assert not bool(keep_ref[:, ::4].all())


def _slow_fixed_mask_obs(weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Column-by-column OBS with a given mask, in float64 with scipy's Cholesky: for each column i,
    the pruned weights' error ``w_i / U_ii`` is taken out of columns i.. through row i of
    ``U = chol(H^-1)`` (upper), H dampened by 1% of its mean diagonal as the stock solver does."""
    import numpy as np
    import scipy.linalg

    h = hessian.double().numpy().copy()
    h[np.diag_indices_from(h)] += 0.01 * np.diag(h).mean()
    upper = scipy.linalg.cholesky(np.linalg.inv(h), lower=False)
    w = weight.double().numpy().copy()
    mask = pruned.numpy()
    for i in range(w.shape[1]):
        err = np.where(mask[:, i], w[:, i] / upper[i, i], 0.0)
        w[:, i:] -= err[:, None] * upper[i, i:][None, :]
    w[mask] = 0.0
    return torch.from_numpy(w)


def test_fixed_mask_is_kept_and_solved_as_column_by_column_obs():
    weight, hessian = _layer(4, rows=12, n=200)
    gen = torch.Generator().manual_seed(5)
    pruned = torch.rand(3, 12, 200, generator=gen) < 0.5  # one mask per expert, not SparseGPT's choice
    hessians = torch.stack([hessian, hessian * 2 + torch.eye(200), hessian.diag().diag() + hessian / 3])
    out, keep = sparsegpt_prune(weight, hessians, sparsity=0.9, fixed_pruned=pruned)
    assert torch.equal(keep, ~pruned)  # the given mask, not the 90% sparsity asked for
    for e in range(3):
        expected = _slow_fixed_mask_obs(weight, hessians[e], pruned[e])
        torch.testing.assert_close(
            out[e].double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
        )
