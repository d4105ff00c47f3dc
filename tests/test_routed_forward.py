"""Every routed forward of ExpandedLinear against the per-token obvious computation.

The reference unpacks each expert from values + bitmask bit by bit in Python and
computes ``x_t @ W_{assignment[t]}^T + bias`` one token at a time in float64. The
forwards under test: host counts (CPU) and device-side (grouped GEMM, padded bmm,
per-token gather), packed and materialized, in float32, float16 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from sparse_expansion_plugin.sparse_expansion import grouped, packing
from sparse_expansion_plugin.sparse_expansion import layer as layer_module
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear
from sparse_expansion_plugin.sparse_expansion.packing import (
    expert_bounds,
    pack_experts,
    unpack_expert,
    unpack_expert_into,
    unpack_experts,
    unpack_experts_at,
)
from sparse_expansion_plugin.sparse_expansion.router import Routing

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # relative to max |y|


def slow_unpack(values: torch.Tensor, mask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[K, out, in]`` float64 from the packed layout, one bit at a time (numpy bit order)."""
    num_experts, out_features, _ = mask.shape
    dense = torch.zeros(num_experts, out_features, in_features, dtype=torch.float64)
    flat_values = values.double().tolist()
    bytes_ = mask.tolist()
    cursor = 0
    for k in range(num_experts):
        for o in range(out_features):
            for i in range(in_features):
                if (bytes_[k][o][i // 8] >> (7 - i % 8)) & 1:
                    dense[k, o, i] = flat_values[cursor]
                    cursor += 1
    assert cursor == len(flat_values)
    return dense


def reference(layer: ExpandedLinear, x: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """For each token t: ``x_t @ W_{assignment[t]}^T + bias`` in float64, W unpacked the slow way."""
    weights = slow_unpack(layer.values.detach(), layer.mask, layer.in_features)
    flat = x.reshape(-1, layer.in_features).double()
    rows = [weights[int(k)] @ row for row, k in zip(flat, assignment, strict=True)]
    out = torch.stack(rows) if rows else torch.zeros(0, layer.out_features, dtype=torch.float64)
    if layer.bias is not None:
        out = out + layer.bias.detach().double()
    return out.reshape(*x.shape[:-1], layer.out_features)


def block_routed_layer(k: int, out: int, inp: int, dtype: torch.dtype, seed: int = 0) -> ExpandedLinear:
    """A layer routed by its (absent) block: the test hands it any routing it likes."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(k, out, inp, generator=gen) >= 0.5
    keep[1] = False  # one expert fully pruned (zero values): its rows must give the bias alone
    weights = (torch.randn(k, out, inp, generator=gen) * keep).to(dtype)
    return ExpandedLinear.from_experts(weights, bias=torch.randn(out, generator=gen).to(dtype), keep=keep)


def run(layer: ExpandedLinear, x: torch.Tensor, assignment: torch.Tensor, path: str) -> torch.Tensor:
    layer.routed_path = path  # type: ignore[assignment]
    layer.block_routing = Routing.from_assignment(assignment, layer.num_experts, source=x)
    try:
        return layer(x)
    finally:
        layer.block_routing = None


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=TOLERANCE[dtype] * scale)


def distributions(k: int, tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    uneven = torch.cat(
        [
            torch.zeros(tokens // 2, dtype=torch.long),
            torch.randint(2, k, (tokens - tokens // 2,), generator=gen),
        ]
    )  # expert 0 holds half, expert 1 none, the rest a few each
    return {
        "uneven": uneven[torch.randperm(tokens, generator=gen)],
        "balanced": torch.arange(tokens) % k,  # padding adds little: the padded bmm
        "one_expert": torch.full((tokens,), k - 1, dtype=torch.long),
        "single_token": torch.tensor([2]),
        "fewer_tokens_than_experts": torch.tensor([3, 0, 3]),
    }


# 32 x 48 keeps grouped GEMM's 16-byte strides in every dtype; 10 x 12 does not (padded bmm)
@pytest.mark.parametrize("shape", [(48, 32), (12, 10)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("materialized", [False, True], ids=["packed", "materialized"])
def test_forward_equals_per_token_reference(shape, dtype, path, materialized):
    out, inp = shape
    layer = block_routed_layer(6, out, inp, dtype)
    if materialized:
        layer.materialize()
    for name, assignment in distributions(6, 40).items():
        x = torch.randn(len(assignment), inp).to(dtype)
        if name == "uneven":
            x = x.reshape(5, 8, inp)  # a batch of sequences, as a model calls it
        y = run(layer, x, assignment, path)
        assert_matches(y, reference(layer, x, assignment), dtype)
    empty = torch.zeros(0, inp, dtype=dtype)
    assert run(layer, empty, torch.zeros(0, dtype=torch.long), path).shape == (0, out)


def test_device_forward_never_reads_counts_on_the_host(monkeypatch):
    """The device forward with grouped GEMM or per-token weights must not ask for host counts."""

    def refuse(self):
        raise AssertionError("host_counts read by the device forward")

    monkeypatch.setattr(Routing, "host_counts", property(refuse))
    layer = block_routed_layer(6, 48, 32, torch.float32)
    many, few = distributions(6, 40)["uneven"], torch.tensor([4, 1])
    for materialized in (False, True):
        if materialized:
            layer.materialize()
        for assignment in (many, few):
            x = torch.randn(len(assignment), 32)
            assert_matches(
                run(layer, x, assignment, "device"), reference(layer, x, assignment), torch.float32
            )


def test_grouped_gemm_detected_on_cpu_and_strides_checked():
    x = torch.randn(8, 32)
    assert grouped.grouped_mm_usable(x, torch.randn(4, 32, 48))
    assert not grouped.grouped_mm_usable(torch.randn(8, 10), torch.randn(4, 10, 12))  # 40-byte rows
    assert not grouped.grouped_mm_usable(x, torch.randn(4, 32, 48, dtype=torch.float16))  # mixed dtypes


def test_packed_forward_unpacks_only_used_experts_once(monkeypatch):
    """CPU: each used expert once, no unused one; device: all experts in one call."""
    per_expert: list[int] = []
    whole: list[list[int] | None] = []

    def counting_one(values, mask, in_features, start, target):
        per_expert.append(start)
        return unpack_expert_into(values, mask, in_features, start, target)

    def counting_all(values, mask, in_features, bounds, experts=None):
        whole.append(None if experts is None else list(experts))
        return unpack_experts(values, mask, in_features, bounds, experts)

    monkeypatch.setattr(layer_module, "unpack_expert_into", counting_one)
    monkeypatch.setattr(layer_module, "unpack_experts", counting_all)
    layer = block_routed_layer(6, 48, 32, torch.float32)
    assignment = torch.tensor([0, 5, 2, 2, 5, 0, 3])
    run(layer, torch.randn(7, 32), assignment, "host")
    bounds = layer.expert_bounds
    assert per_expert == [bounds[0], bounds[2], bounds[3], bounds[5]] and whole == []
    per_expert.clear()
    run(layer, torch.randn(7 * 2, 32), assignment.repeat(2), "device")
    assert whole == [None] and per_expert == []  # all experts, once, on the device forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_device_decoding_gathers_only_while_that_allocates_less(monkeypatch, dtype):
    """Fewer tokens than experts: the per-token gather holds ~17 bytes per weight position and
    token (bool mask, two int64 index tensors); unpacking all K holds K dense experts plus one
    step's mask and int64 prefix sum (9 bytes per position). The forward must pick the smaller,
    and give the reference result either way."""
    calls: list[str] = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(layer_module, name, wrapped)

    spy("unpack_experts", unpack_experts)
    spy("unpack_experts_at", unpack_experts_at)
    k, out, inp = 6, 48, 32
    layer = block_routed_layer(k, out, inp, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    positions = out * inp
    whole = k * positions * size + k * positions * 9  # one step holds every expert of a small layer
    for tokens in range(1, k):
        calls.clear()
        assignment = torch.arange(tokens) % k
        x = torch.randn(tokens, inp).to(dtype)
        assert_matches(run(layer, x, assignment, "device"), reference(layer, x, assignment), dtype)
        expected = "unpack_experts_at" if tokens * positions * 17 <= whole else "unpack_experts"
        assert calls == [expected], (tokens, calls)


def test_input_gradient_through_the_host_forward():
    """Autograd keeps each expert's weight: the reused unpacking buffer must not be overwritten."""
    layer = block_routed_layer(6, 48, 32, torch.float32)
    assignment = distributions(6, 40)["uneven"]
    x = torch.randn(40, 32, requires_grad=True)
    grad_out = torch.randn(40, 48)
    run(layer, x, assignment, "host").backward(grad_out)
    weights = slow_unpack(layer.values, layer.mask, 32)
    expected = torch.stack([g.double() @ weights[int(k)] for g, k in zip(grad_out, assignment, strict=True)])
    assert x.grad is not None
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [None, 40], ids=["one_step", "steps_of_two_rows"])
def test_unpackers_equal_the_bit_by_bit_reference(step, monkeypatch):
    if step is not None:  # CPU unpacking works a few rows at a time on large experts
        monkeypatch.setattr(packing, "_CPU_STEP_POSITIONS", step)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(5, 7, 21, generator=gen) > 0.4  # 21 columns: a partial last mask byte
    weights = torch.randn(5, 7, 21, generator=gen) * keep
    values, mask, nnz = pack_experts(weights, keep)
    expected = slow_unpack(values, mask, 21)
    bounds = expert_bounds(nnz)
    assert bounds == [0, *torch.cumsum(keep.flatten(1).sum(1), 0).tolist()]
    assert torch.equal(unpack_experts(values, mask, 21, bounds).double(), expected)
    for subset in ([0, 2, 3], [4], [1, 2]):
        assert torch.equal(unpack_experts(values, mask, 21, bounds, subset).double(), expected[subset])
    for k in range(5):
        assert torch.equal(unpack_expert(values, mask[k], bounds[k], 21).double(), expected[k])
    starts = torch.tensor(bounds[:-1])
    index = torch.tensor([3, 0, 3, 4])  # repeats allowed
    assert torch.equal(unpack_experts_at(values, mask, 21, starts, index).double(), expected[index])


def test_bad_routed_path_is_named():
    layer = block_routed_layer(3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="routed_path must be one of"):
        run(layer, torch.randn(2, 8), torch.tensor([0, 2]), "gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_forward_has_no_host_sync():
    layer = block_routed_layer(6, 64, 32, torch.bfloat16).cuda()
    for assignment in (distributions(6, 64)["uneven"], torch.tensor([5])):
        assignment = assignment.cuda()
        x = torch.randn(len(assignment), 32, device="cuda", dtype=torch.bfloat16)
        run(layer, x, assignment, "auto")  # warm up: the expert starts are copied to the GPU once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer.block_routing = Routing.from_assignment(assignment, 6, source=x)
            y = layer(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            layer.block_routing = None
        assert_matches(y.cpu(), reference(layer.cpu(), x.cpu(), assignment.cpu()), torch.bfloat16)
        layer.cuda()
