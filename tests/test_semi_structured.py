"""2:4 experts stored as torch semi-structured sparse tensors, against the per-token obvious computation.

The forward itself needs CUDA (torch builds these tensors nowhere else): those
tests are skipped on CPU and run by the GPU check's environment. On CPU: the
2:4 pattern test against a loop, and the errors that name the problem.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import benchmark_module
from test_routed_forward import assert_matches, distributions, reference

from sparse_expansion_plugin.sparse_expansion import layer as layer_module
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, store_experts_semi_structured
from sparse_expansion_plugin.sparse_expansion.router import Routing
from sparse_expansion_plugin.sparse_expansion.semi_structured import is_two_four

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="semi-structured sparse tensors need a CUDA GPU of compute capability 8.0+",
)


def slow_is_two_four(keep: torch.Tensor) -> bool:
    rows = keep.reshape(-1, keep.shape[-1]).tolist()
    if keep.shape[-1] % 4:
        return False
    return all(sum(row[i : i + 4]) <= 2 for row in rows for i in range(0, len(row), 4))


def two_four_layer(k: int, out: int, inp: int, dtype: torch.dtype, seed: int = 0) -> ExpandedLinear:
    """K experts, each keeping 2 random inputs of every 4 (one keeping 1 of 4, still 2:4)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(k, out, inp // 4, 4, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    keep[0, :, :, 0] = False  # fewer than 2 kept in some groups is allowed
    keep = keep.reshape(k, out, inp)
    weights = (torch.randn(k, out, inp, generator=gen) * keep).to(dtype)
    return ExpandedLinear.from_experts(weights, bias=torch.randn(out, generator=gen).to(dtype), keep=keep)


def test_two_four_pattern_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    layer = two_four_layer(3, 8, 16, torch.float32)
    keep = torch.stack([layer.expert_keep_mask(k) for k in range(3)])
    assert slow_is_two_four(keep) and is_two_four(keep)
    for _ in range(50):
        keep = torch.rand(2, 3, 8, generator=gen) > 0.6
        assert is_two_four(keep) == slow_is_two_four(keep)
    assert not is_two_four(torch.ones(2, 6, dtype=torch.bool))  # width not a multiple of 4


def test_cpu_layer_is_refused_with_the_reason():
    layer = two_four_layer(2, 32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="on CUDA only"):
        layer.store_semi_structured()
    assert layer.semi_structured_experts is None


def test_experts_that_are_not_two_four_are_refused(monkeypatch):
    monkeypatch.setattr(layer_module, "semi_structured_problem", lambda *args: None)  # as if on a GPU
    keep = torch.ones(2, 4, 8, dtype=torch.bool)
    keep[:, :, :4] = False  # 4 of every other group of 4 kept
    layer = ExpandedLinear.from_experts(torch.randn(2, 4, 8) * keep, keep=keep)
    with pytest.raises(ValueError, match="not 2:4 sparse.*mask_structure"):
        store_experts_semi_structured(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing_of_the_semi_structured_forward_on_cpu(dtype, monkeypatch):
    """The forward's grouping and scatter, with each expert's plain dense weight in place of torch's
    semi-structured tensor (the one piece CPU cannot build): same per-token result."""
    monkeypatch.setattr(layer_module, "semi_structured_problem", lambda *args: None)
    monkeypatch.setattr(layer_module, "to_semi_structured", lambda weight: weight.clone())
    layer = two_four_layer(6, 16, 32, dtype)
    layer.store_semi_structured()
    for assignment in distributions(6, 40).values():
        x = torch.randn(len(assignment), 32, dtype=dtype)
        layer.block_routing = Routing.from_assignment(assignment, 6, source=x)
        try:
            y = layer(x)
        finally:
            layer.block_routing = None
        assert_matches(y, reference(layer, x, assignment), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_semi_structured_forward_matches_the_per_token_computation(dtype):
    layer = two_four_layer(6, 64, 128, dtype).cuda()
    stored = layer.store_semi_structured()
    dense_bytes = 6 * 64 * 128 * layer.values.element_size()
    assert 0 < stored <= 0.6 * dense_bytes  # kept half plus metadata, not a dense copy
    for name, assignment in itertools.chain(
        distributions(6, 96).items(), [("all_tokens", torch.arange(96) % 6)]
    ):
        x = torch.randn(len(assignment), 128, dtype=dtype)
        layer.block_routing = Routing.from_assignment(assignment.cuda(), 6, source=x.cuda())
        try:
            y = layer(x.cuda())
        finally:
            layer.block_routing = None
        assert layer.semi_structured_experts is not None, name
        assert_matches(y.cpu(), reference(layer.cpu(), x, assignment), dtype)
        layer.cuda()  # moving to the CPU for the reference dropped them: store again
        layer.store_semi_structured()


@needs_cuda
def test_moving_the_layer_drops_them_and_falls_back_to_packed():
    layer = two_four_layer(4, 32, 64, torch.bfloat16).cuda()
    layer.store_semi_structured()
    layer.to(torch.float16)
    assert layer.semi_structured_experts is None
    x = torch.randn(10, 64, dtype=torch.float16)
    assignment = torch.arange(10) % 4
    layer.block_routing = Routing.from_assignment(assignment.cuda(), 4, source=x.cuda())
    y = layer(x.cuda())
    layer.block_routing = None
    assert_matches(y.cpu(), reference(layer.cpu(), x, assignment), torch.float16)


def test_semi_structured_routing_loop_and_keeping_on_cpu_with_dense_stand_ins():
    """The semi-structured forward's routing loop (shared with the CPU path), run on CPU with plain
    dense weights standing in for the semi-structured tensors (torch builds those only on CUDA). The
    stand-ins are another layer's experts, so the output shows that branch ran: against the per-token
    float64 reference of that other layer, for every routing shape. A ``.to()`` that changes nothing
    keeps them; one that casts drops them."""
    layer = two_four_layer(6, 64, 128, torch.float32)
    other = two_four_layer(6, 64, 128, torch.float32, seed=1)
    assert layer.bias is not None and other.bias is not None
    other.bias.data.copy_(layer.bias)
    for name, assignment in distributions(6, 96).items():
        layer.semi_structured_experts = [other.expert_weight(k).clone() for k in range(6)]
        x = torch.randn(len(assignment), 128)
        layer.block_routing = Routing.from_assignment(assignment, 6, source=x)
        try:
            y = layer(x)
        finally:
            layer.block_routing = None
        assert y.shape == (len(assignment), 64), name
        assert_matches(y, reference(other, x, assignment), torch.float32)
    layer.to(torch.float32)
    layer.to("cpu")
    assert layer.semi_structured_experts is not None  # nothing moved or cast
    layer.to(torch.float64)
    assert layer.semi_structured_experts is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_speed_benchmark_without_cuda_says_so(capsys):
    with benchmark_module("semi_structured_speed") as bench:
        assert bench.main([]) == 0
    assert capsys.readouterr().out.strip() == bench.NO_CUDA
