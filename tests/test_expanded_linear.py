"""ExpandedLinear against a slow per-token loop over dense expert weights; compact storage round trips."""

from __future__ import annotations

import pytest
import torch

from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, is_expanded, materialize_experts
from sparse_expansion_plugin.sparse_expansion.packing import pack_experts, unpack_expert, unpack_mask
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter


def random_experts(k: int, out: int, inp: int, sparsity: float = 0.5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(k, out, inp, generator=gen)
    return weights * (torch.rand(k, out, inp, generator=gen) >= sparsity)


def random_router(inp: int, k: int, seed: int = 0) -> ExpertRouter:
    gen = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(inp, 3, generator=gen))[0].t()
    return ExpertRouter.from_pca_kmeans(
        torch.randn(inp, generator=gen), components, torch.randn(k, 3, generator=gen)
    )


def per_token_reference(
    x: torch.Tensor, router: ExpertRouter, weights: torch.Tensor, bias: torch.Tensor | None
):
    """The obvious loop: each token's row times its nearest-centroid expert (float64)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    scores = flat @ router.weight.double().t() + router.bias.double()
    rows = []
    for token, k in zip(flat, scores.argmax(1), strict=True):
        y = weights[k].double() @ token
        rows.append(y + bias.double() if bias is not None else y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def test_pack_unpack_round_trip_and_bytes():
    weights = random_experts(5, 7, 21)  # 21 columns: a partial last mask byte
    values, mask, nnz = pack_experts(weights)
    assert mask.shape == (5, 7, 3) and mask.dtype == torch.uint8
    assert int(nnz.sum()) == values.numel() == int((weights != 0).sum())
    offset = 0
    for k in range(5):
        assert torch.equal(unpack_expert(values, mask[k], offset, 21), weights[k])
        assert torch.equal(unpack_mask(mask[k], 21), weights[k] != 0)
        offset += int(nnz[k])
    dense_bytes = weights.numel() * 4
    assert values.numel() * 4 + mask.numel() < 0.7 * dense_bytes


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_per_token_loop(bias):
    weights = random_experts(4, 12, 10)
    router = random_router(10, 4)
    b = torch.randn(12) if bias else None
    layer = ExpandedLinear.from_experts(weights, router, b)
    x = torch.randn(3, 9, 10)
    y = layer(x)
    assert y.shape == (3, 9, 12)
    assert len({int(k) for k in router(x).assignment}) > 1  # several experts really used
    torch.testing.assert_close(y.double(), per_token_reference(x, router, weights, b), rtol=1e-5, atol=1e-5)


def test_batched_equals_one_token_at_a_time_and_materialized():
    weights = random_experts(6, 16, 8, seed=3)
    router = random_router(8, 6, seed=3)
    layer = ExpandedLinear.from_experts(weights, router, torch.randn(16))
    x = torch.randn(4, 11, 8)
    batched = layer(x)
    single = torch.stack([torch.stack([layer(x[i, t : t + 1]) for t in range(11)]) for i in range(4)])
    torch.testing.assert_close(batched, single.reshape(4, 11, 16), rtol=1e-6, atol=1e-6)
    model = torch.nn.Sequential(layer, router)
    assert is_expanded(model)
    assert materialize_experts(model) == 6 * 16 * 8 * 4
    torch.testing.assert_close(layer(x.clone()), batched, rtol=1e-6, atol=1e-6)  # GEMM layout differs
    materialize_experts(model, enable=False)
    assert layer.dense_experts is None


def test_expert_accessors_and_shape_checks():
    weights = random_experts(3, 5, 9)
    router = random_router(9, 3)
    layer = ExpandedLinear.from_experts(weights, router)
    for k in range(3):
        assert torch.equal(layer.expert_weight(k), weights[k])
        assert torch.equal(layer.expert_keep_mask(k), weights[k] != 0)
    assert layer.stored_bytes() < weights.numel() * 4
    with pytest.raises(ValueError, match="router routes"):
        ExpandedLinear.from_experts(random_experts(2, 5, 9), router)
    with pytest.raises(ValueError, match=r"\[K, out, in\]"):
        pack_experts(torch.randn(5, 9))


def test_bfloat16_layer_routes_in_float32():
    weights = random_experts(4, 12, 10).to(torch.bfloat16)
    router = random_router(10, 4)
    layer = ExpandedLinear.from_experts(weights, router)
    holder = torch.nn.ModuleDict({"layer": layer, "router": router}).to(torch.bfloat16)
    x = torch.randn(2, 5, 10, dtype=torch.bfloat16)
    y = holder["layer"](x)
    assert y.dtype == torch.bfloat16 and router.weight.dtype == torch.float32
    torch.testing.assert_close(
        y.double(), per_token_reference(x, router, weights, None), rtol=2e-2, atol=2e-2
    )


def test_cost_report_counts_bytes_and_flops_by_hand():
    from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost

    k, out, inp = 4, 16, 24
    keep = torch.zeros(k, out, inp, dtype=torch.bool)
    keep[..., ::2] = True  # exactly 50% kept in every expert
    weights = torch.randn(k, out, inp) * keep
    router = random_router(inp, k)
    model = torch.nn.ModuleDict({"fc": ExpandedLinear.from_experts(weights, router, keep=keep), "r": router})
    cost = expansion_cost(model)
    params = out * inp
    assert cost.dense_bytes == 4 * params
    assert cost.sparsegpt_compact_bytes == 4 * params // 2 + params // 8
    assert cost.expanded_bytes == k * (4 * params // 2 + params // 8) + 8 * k + 4 * k * (inp + 1)
    assert cost.dense_flops_per_token == 2 * params
    assert cost.router_flops_per_token == 2 * k * inp
    assert cost.routed_flops_per_token_nonzero == params + 2 * k * inp
    assert cost.density_mean == 0.5


def test_materialize_from_given_experts_equals_per_token_loop():
    """The modifier hands over the dense pruned weights it packed: the forward must use each in its place."""
    weights = random_experts(5, 9, 7, seed=4)
    router = random_router(7, 5, seed=4)
    bias = torch.randn(9)
    layer = ExpandedLinear.from_experts(weights, router, bias)
    assert layer.materialize(experts=weights) == 5 * 9 * 7 * 4
    x = torch.randn(2, 13, 7)
    assert len({int(k) for k in router(x).assignment}) > 1
    torch.testing.assert_close(
        layer(x).double(), per_token_reference(x, router, weights, bias), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="experts must be"):
        layer.materialize(experts=weights[:4])
