"""Compact storage of K pruned copies of one weight: the kept values plus a bitmask.

Why: an expert is a pruned copy of the dense weight, so K dense zero-filled
copies cost K times the dense layer. Stored as values + one bit per position,
a K-expert layer at sparsity s costs ``K * (1 - s) * numel * bytes + K * numel / 8``
bytes instead. A bitmask costs the same as packed N:M indices for 2:4
(2 bits per kept value = 1 bit per position), so one format serves both.

Layout (all tensors, so they travel in a state dict):
  values: ``[nnz_total]`` kept weights of all experts, expert-major, row-major within
  mask:   ``[K, out, ceil(in / 8)]`` uint8, numpy ``packbits`` order (big-endian bits)
  nnz:    ``[K]`` int64 kept values per expert
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def pack_experts(weights: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pack ``weights [K, out, in]`` into ``(values [nnz], mask [K, out, ceil(in/8)], nnz [K])``.

    ``keep`` (bool, same shape) says which positions are stored; default: the non-zeros.
    Positions kept by the mask whose value happens to be 0 are stored as 0.
    """
    if weights.dim() != 3:
        raise ValueError(f"expert weights must be [K, out, in], got {tuple(weights.shape)}")
    if keep is None:
        keep = weights != 0
    if keep.shape != weights.shape:
        raise ValueError(f"keep mask {tuple(keep.shape)} differs from weights {tuple(weights.shape)}")
    keep_np = keep.to(device="cpu", dtype=torch.bool).numpy()
    host = weights.detach().cpu()
    # numpy's boolean gather and count_nonzero are ~2x and ~10x faster than torch's on CPU
    # (0.07 s vs 0.14 s and 6 ms vs 60 ms for 16 x 1536 x 576); bfloat16 has no numpy dtype
    if host.dtype == torch.bfloat16:
        values = host[torch.from_numpy(keep_np)].contiguous()
    else:
        values = torch.from_numpy(host.numpy()[keep_np])
    mask = torch.from_numpy(np.packbits(keep_np, axis=-1))
    nnz = torch.from_numpy(np.count_nonzero(keep_np.reshape(keep_np.shape[0], -1), axis=1).astype(np.int64))
    return values.to(weights.device), mask.to(weights.device), nnz.to(weights.device)


def unpack_mask(mask: Tensor, in_features: int) -> Tensor:
    """Bool keep mask ``[..., in]`` from packed ``mask [..., ceil(in/8)]`` (numpy bit order)."""
    if mask.device.type != "cpu":  # stay on the accelerator: shift out the 8 bits of each byte
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=mask.device)
        bits = (mask.unsqueeze(-1) >> shifts) & 1
        return bits.flatten(-2)[..., :in_features].bool()
    unpacked = np.unpackbits(mask.detach().numpy(), axis=-1, count=in_features)
    return torch.from_numpy(unpacked.view(np.bool_))


def expert_bounds(nnz: Tensor) -> list[int]:
    """Where each expert's values start and end: ``[0, nnz[0], nnz[0] + nnz[1], ..., nnz_total]`` (host ints).

    Computed once per layer (at build and load), so no forward reads ``nnz`` back from a device.
    """
    bounds = [0]
    for count in nnz.tolist():
        bounds.append(bounds[-1] + int(count))
    return bounds


def _expert_values(values: Tensor, bounds: Sequence[int], experts: Sequence[int]) -> Tensor:
    """The values of ``experts`` (ascending) back to back: one slice per run of consecutive experts."""
    runs: list[tuple[int, int]] = []
    for k in experts:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    parts = [values[bounds[first] : bounds[end]] for first, end in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# Positions per inner step. CPU: the step's temporaries (1 + 4 bytes per position) should stay
# in cache: 2^18 positions measured 1.0 ms per 1536 x 576 fp32 expert, whole experts at once
# 1.45 ms and four at once 3.7 ms. GPU: bounds masked_scatter's 8-byte prefix sum while every
# expert of a small or medium layer still unpacks in one kernel (SmolLM2: 16 x 1536 x 576 = 14M).
_CPU_STEP_POSITIONS = 1 << 18
DEVICE_STEP_POSITIONS = 1 << 27
"""Positions (``experts * out * in``) one off-CPU unpacking step covers."""
# Transient device bytes per weight position, read off the ops below: one unpacking step holds the
# bool keep mask and masked_scatter_'s int64 prefix sum; the gather holds the keep mask and two
# int64 index tensors at its widest (values and the result come to 2b <= 8 bytes, less).
UNPACK_STEP_BYTES_PER_POSITION = 1 + 8
GATHER_BYTES_PER_POSITION = 1 + 8 + 8


def device_unpack_bytes(num_experts: int, positions: int, element_size: int) -> int:
    """Device bytes :func:`unpack_experts` allocates off CPU for all ``num_experts`` experts of
    ``positions = out * in`` weights: the dense result plus one step's mask and prefix sum."""
    step_experts = min(num_experts, max(1, DEVICE_STEP_POSITIONS // max(1, positions)))
    return num_experts * positions * element_size + step_experts * positions * UNPACK_STEP_BYTES_PER_POSITION


def gather_unpack_bytes(tokens: int, positions: int) -> int:
    """Device bytes :func:`unpack_experts_at` allocates for ``tokens`` experts of ``positions`` weights."""
    return tokens * positions * GATHER_BYTES_PER_POSITION


def unpack_experts(
    values: Tensor,
    mask: Tensor,
    in_features: int,
    bounds: Sequence[int],
    experts: Sequence[int] | None = None,
) -> Tensor:
    """Dense weights ``[n, out, in]`` of ``experts`` (ascending; default all K) in one unpacking call.

    ``bounds``: :func:`expert_bounds` of this layer. On a GPU one ``masked_scatter_``
    kernel per step (its size check is asynchronous: no host sync). On CPU each
    kept position's value is found by a prefix count of the mask bits and one
    ``index_select``: 1.0 ms for a 1536 x 576 fp32 expert on one thread, against
    3.4 ms for ``masked_scatter_`` and 3.9 ms for numpy's boolean assignment
    (why this hot path mixes numpy, whose int32 ``cumsum`` is 2x torch's, and torch).
    """
    chosen = list(range(mask.shape[0])) if experts is None else list(experts)
    out_features = mask.shape[1]
    dense = torch.empty(len(chosen), out_features, in_features, dtype=values.dtype, device=values.device)
    if mask.device.type == "cpu":
        for i, k in enumerate(chosen):
            unpack_expert_into(values, mask[k], in_features, bounds[k], dense[i])
        return dense
    step = max(1, DEVICE_STEP_POSITIONS // max(1, out_features * in_features))
    for first in range(0, len(chosen), step):
        group = chosen[first : first + step]
        if group == list(range(group[0], group[-1] + 1)):  # a slice: no index tensor copied to the device
            keep = unpack_mask(mask[group[0] : group[-1] + 1], in_features)
        else:
            index = torch.tensor(group, dtype=torch.long, device=mask.device)
            keep = unpack_mask(mask.index_select(0, index), in_features)
        dense[first : first + len(group)].zero_().masked_scatter_(keep, _expert_values(values, bounds, group))
    return dense


def unpack_expert_into(values: Tensor, mask: Tensor, in_features: int, start: int, target: Tensor) -> Tensor:
    """Fill ``target [out, in]`` (CPU, contiguous) with one expert; returns ``target``.

    ``mask [out, ceil(in/8)]`` is the expert's bitmask, ``start`` where its values begin.
    Works ``_CPU_STEP_POSITIONS`` positions at a time: ``rank`` (1-based running
    count of kept positions, 0 where not kept) indexes the step's values behind
    one leading zero, so unkept positions read 0. Filling a buffer the caller
    reuses spares a fresh allocation (and its page faults) per expert.
    """
    host_mask, flat_values = mask.detach().numpy(), values.detach()
    rows = max(1, _CPU_STEP_POSITIONS // max(1, in_features))
    for first in range(0, host_mask.shape[0], rows):
        bits = np.unpackbits(host_mask[first : first + rows], axis=-1, count=in_features).reshape(-1)
        rank = np.cumsum(bits, dtype=np.int32)  # a step holds < 2^31 positions
        kept = int(rank[-1])
        rank *= bits
        source = torch.cat([flat_values.new_zeros(1), flat_values[start : start + kept]])
        torch.index_select(source, 0, torch.from_numpy(rank), out=target[first : first + rows].view(-1))
        start += kept
    return target


def unpack_experts_at(
    values: Tensor, mask: Tensor, in_features: int, starts: Tensor, experts: Tensor
) -> Tensor:
    """Dense weights ``[n, out, in]`` of ``experts`` given as a device tensor ``[n]`` (repeats allowed).

    Why a second unpacker: when the experts are only known on the device (the
    routing of one decoded token on a GPU), slicing ``values`` would need their
    offsets on the host (a sync). Here each kept position finds its value by a
    prefix count of the mask bits plus the expert's start (``starts [K]`` on the
    device): a gather, no host round trip. Costs ``int64`` index temporaries of
    ``n * out * in`` elements, so it is meant for a few experts (decoding).
    """
    keep = unpack_mask(mask.index_select(0, experts), in_features).flatten(1)  # [n, out * in]
    if values.numel() == 0:  # every expert fully pruned: nothing to gather
        return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).view(
            -1, mask.shape[1], in_features
        )
    position = torch.cumsum(keep, dim=1) - 1 + starts.index_select(0, experts).unsqueeze(1)
    gathered = values[position.clamp_(min=0, max=values.numel() - 1)]
    dense = torch.where(keep, gathered, torch.zeros((), dtype=values.dtype, device=values.device))
    return dense.view(experts.shape[0], mask.shape[1], in_features)


def unpack_expert(values: Tensor, mask: Tensor, offset: int, in_features: int) -> Tensor:
    """Dense weight ``[out, in]`` of one expert from its packed ``mask [out, ceil(in/8)]``.

    ``offset`` is where this expert's values start in ``values``.
    """
    if mask.device.type == "cpu":
        target = torch.empty(mask.shape[0], in_features, dtype=values.dtype)
        return unpack_expert_into(values, mask, in_features, offset, target)
    keep = unpack_mask(mask, in_features)
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    return dense.masked_scatter_(keep, values[offset:])


def packed_bytes(values: Tensor, mask: Tensor, nnz: Tensor) -> int:
    """Bytes held by one packed layer (values + bitmask + counts)."""
    return sum(t.numel() * t.element_size() for t in (values, mask, nnz))
