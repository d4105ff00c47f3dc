"""``benchmarks/router_feature_screen.py``: its block errors against slow per-token loops, its K = 1
experts against SparseGPT on the plain Hessian, and the linearity its feature maps claim."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import benchmark_module

from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune


@pytest.fixture(scope="module")
def screen():
    with benchmark_module("router_feature_screen") as module:
        yield module


def tiny_mlp(d: int = 8, inter: int = 16, seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    return SimpleNamespace(
        gate_proj=torch.nn.Linear(d, inter, bias=False),
        up_proj=torch.nn.Linear(d, inter, bias=False),
        down_proj=torch.nn.Linear(inter, d, bias=False),
    )


def slow_block(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One token's MLP output in float64, written out."""
    x, gate, up, down = (t.detach().double() for t in (x, gate, up, down))
    g, u = gate @ x, up @ x
    return down @ (g / (1 + torch.exp(-g)) * u)


def test_routed_and_oracle_errors_match_per_token_loops(screen):
    mlp = tiny_mlp()
    x = torch.randn(60, 8)
    k = 3
    experts = tuple(
        m.weight.detach() * (torch.rand(k, *m.weight.shape) > 0.5)
        for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    )
    labels = torch.randint(0, k, (60,))
    dense = [slow_block(t, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) for t in x]
    norm = sum(float((y**2).sum()) for y in dense)
    errs = [
        [float(((y - slow_block(t, *(w[e] for w in experts))) ** 2).sum()) for e in range(k)]
        for t, y in zip(x, dense, strict=True)
    ]
    routed = sum(errs[i][int(labels[i])] for i in range(60)) / norm
    oracle = sum(min(row) for row in errs) / norm
    assert screen.routed_error(mlp, experts, x, labels) == pytest.approx(routed, rel=1e-4)
    assert screen.oracle_error(mlp, experts, x) == pytest.approx(oracle, rel=1e-4)
    assert oracle < routed


def test_one_expert_is_sparsegpt_on_the_plain_hessian(screen):
    torch.manual_seed(1)
    weight = torch.randn(12, 8)
    inputs = torch.randn(300, 8) * torch.linspace(0.2, 3.0, 8)
    got = screen.experts(weight, inputs, torch.zeros(300, dtype=torch.long), 1, 64.0)
    want, keep = sparsegpt_prune(weight, inputs.double().t() @ inputs.double(), sparsity=0.5)
    assert got.shape == (1, 12, 8)
    assert torch.equal(got[0] != 0, keep)
    torch.testing.assert_close(got[0], want.float(), rtol=1e-4, atol=1e-5)


def test_foldable_feature_maps_are_linear_and_abs_is_not(screen):
    mlp = tiny_mlp(seed=2)
    gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    tokens = screen.unit(torch.randn(50, 8))
    maps = screen.feature_maps(gate, up, tokens)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    for name, f in maps.items():
        linear = torch.allclose(f(2 * a - 3 * b), 2 * f(a) - 3 * f(b), atol=1e-5)
        assert linear == ("not foldable" not in name), name


def test_shared_mask_experts_keep_sparsegpts_mask_and_differ_in_values(screen):
    mlp = tiny_mlp(d=16, inter=32)
    x = torch.randn(400, 16)
    labels = torch.arange(400) % 3
    stock = screen.block_experts(mlp, x, torch.zeros(400, dtype=torch.long), 1, 0.0)
    masks = tuple(w[0] == 0 for w in stock)
    shared = screen.block_experts(mlp, x, labels, 3, 0.0, shared_masks=masks)
    for w, mask in zip(shared, masks, strict=True):
        for e in range(3):
            assert torch.equal(w[e] == 0, mask)
        assert not torch.equal(w[0], w[1])  # values solved on each cluster's own Hessian


def test_soft_hessians_with_no_share_are_the_hard_clusters(screen):
    """With a zero share every token counts in its own cluster only: the package's streaming Hessians
    and count prior (``experts``) must give the same experts as the screen's direct sums."""
    torch.manual_seed(2)
    weight = torch.randn(12, 16)
    x = torch.randn(300, 16) * torch.linspace(0.2, 2.0, 16)
    first = torch.arange(300) % 3
    second = (first + 1) % 3
    soft = screen.soft_experts(weight, x, first, second, torch.zeros(300), 3, 64.0)
    hard = screen.experts(weight, x, first, 3, 64.0)
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-5)
    shared = screen.soft_experts(weight, x, first, second, torch.full((300,), 0.4), 3, 64.0)
    assert not torch.allclose(shared, hard, atol=1e-3)  # the share does reach the Hessians


def test_row_group_error_matches_a_per_token_loop(screen):
    """Each token's hidden state takes every neuron group's rows from that group's own expert, and the
    down projection from the block's expert: written out token by token, row by row, in float64."""
    mlp = tiny_mlp(d=8, inter=12, seed=3)
    gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    down = mlp.down_proj.weight.detach()
    x = torch.randn(40, 8)
    k = 3
    groups = [torch.tensor([0, 5, 7, 9]), torch.tensor([1, 2, 3, 4, 6, 8, 10, 11])]
    group_labels = [torch.randint(0, k, (40,)), torch.randint(0, k, (40,))]
    gate_up = [
        (
            idx,
            gate[idx] * (torch.rand(k, len(idx), 8) > 0.5),
            up[idx] * (torch.rand(k, len(idx), 8) > 0.5),
        )
        for idx in groups
    ]
    down_k = down * (torch.rand(k, *down.shape) > 0.5)
    labels = torch.randint(0, k, (40,))
    err, norm = 0.0, 0.0
    for t in range(40):
        g_t, u_t = gate.clone(), up.clone()
        for (idx, g_k, u_k), lab in zip(gate_up, group_labels, strict=True):
            g_t[idx], u_t[idx] = g_k[int(lab[t])], u_k[int(lab[t])]
        y = slow_block(x[t], gate, up, down)
        err += float(((y - slow_block(x[t], g_t, u_t, down_k[int(labels[t])])) ** 2).sum())
        norm += float((y**2).sum())
    got = screen.row_group_error(mlp, gate_up, down_k, x, group_labels, labels)
    assert got == pytest.approx(err / norm, rel=1e-4)


@pytest.mark.parametrize("how", ["contiguous", "kmeans"])
def test_neuron_groups_partition_the_neurons(screen, how):
    mlp = tiny_mlp(d=8, inter=24, seed=4)
    groups = screen.neuron_groups(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), 4, how, 0)
    assert 1 < len(groups) <= 4
    assert torch.equal(torch.cat(groups).sort().values, torch.arange(24))
