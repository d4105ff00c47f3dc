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


def unpack_expert(values: Tensor, mask: Tensor, offset: int, in_features: int) -> Tensor:
    """Dense weight ``[out, in]`` of one expert from its packed ``mask [out, ceil(in/8)]``.

    ``offset`` is where this expert's values start in ``values``. Cost: one pass
    over ``out * in`` positions; no index tensors are stored. On CPU numpy's
    ``unpackbits`` + ``flatnonzero`` + fancy assignment is about 10x faster than
    ``torch.masked_scatter_`` (1.6 ms vs 20 ms for a 576 x 1536 weight), which is
    why this hot path leaves torch.
    """
    out_features = mask.shape[0]
    if mask.device.type != "cpu" or values.dtype == torch.bfloat16:
        keep = unpack_mask(mask, in_features)
        count = int(keep.sum())
        dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
        dense.masked_scatter_(keep, values[offset : offset + count])
        return dense
    bits = np.unpackbits(mask.detach().numpy(), axis=-1, count=in_features).reshape(-1)
    index = np.flatnonzero(bits)
    dense = torch.zeros(out_features * in_features, dtype=values.dtype)
    dense.numpy()[index] = values.detach()[offset : offset + index.size].numpy()
    return dense.view(out_features, in_features)


def packed_bytes(values: Tensor, mask: Tensor, nnz: Tensor) -> int:
    """Bytes held by one packed layer (values + bitmask + counts)."""
    return sum(t.numel() * t.element_size() for t in (values, mask, nnz))
