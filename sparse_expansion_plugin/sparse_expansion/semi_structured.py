"""2:4 experts as PyTorch semi-structured sparse tensors (CUDA): multiplied without unpacking.

Why: a packed expert (values + bitmask) must be unpacked to a dense weight
before its matmul. An expert pruned 2:4 can instead live as torch's
``SparseSemiStructuredTensor`` (the kept half of the values plus 2-bit
metadata, about 56% of the dense bytes, the same as our packing), which the
GPU's sparse tensor cores multiply directly. torch builds these on CUDA only,
in float16 / bfloat16, for weights whose rows are a multiple of 32 (CUTLASS)
or 16 (cuSPARSELt) and columns of 64 / 16.

Pure functions; :meth:`~.layer.ExpandedLinear.store_semi_structured` uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def is_two_four(keep: Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row keeps at most 2 (``keep [..., in]``)."""
    if keep.shape[-1] % 4:
        return False
    groups = keep.reshape(*keep.shape[:-1], keep.shape[-1] // 4, 4)
    return bool((groups.sum(-1) <= 2).all())


def semi_structured_problem(
    device: torch.device, dtype: torch.dtype, out_features: int, in_features: int
) -> str | None:
    """Why experts of this shape, dtype and device cannot be stored semi-structured, or None when they can."""
    if device.type != "cuda":
        return f"the layer is on {device.type}; torch builds semi-structured sparse tensors on CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "semi-structured sparse matmuls need a GPU of compute capability 8.0 or newer"
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return (
            f"the layer is {dtype}; semi-structured experts need float16 or bfloat16 (cast the model first)"
        )
    rows, cols = _shape_rule()
    if out_features % rows or in_features % cols:
        return (
            f"a {out_features} x {in_features} weight: torch's semi-structured kernels need rows a multiple "
            f"of {rows} and columns a multiple of {cols}"
        )
    return None


def _use_cusparselt() -> bool:
    return bool(torch.backends.cusparselt.is_available())


def _shape_rule() -> tuple[int, int]:
    """(rows, columns) multiples the chosen backend requires of a sparse weight (float16/bfloat16)."""
    return (16, 16) if _use_cusparselt() else (32, 64)


def to_semi_structured(weight: Tensor) -> Tensor:
    """A dense 2:4-pruned ``weight [out, in]`` (zeros where pruned) as a semi-structured sparse tensor.

    cuSPARSELt where the build has it, else CUTLASS: chosen per call, without
    setting torch's process-wide ``_FORCE_CUTLASS`` flag.
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    backend = SparseSemiStructuredTensorCUSPARSELT if _use_cusparselt() else SparseSemiStructuredTensorCUTLASS
    return backend.from_dense(weight.contiguous())


def semi_structured_bytes(weight: Tensor) -> int:
    """Bytes a semi-structured tensor holds (its packed values and metadata)."""
    total = 0
    for name in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
        part = getattr(weight, name, None)
        if isinstance(part, Tensor):
            total += part.numel() * part.element_size()
    return total
