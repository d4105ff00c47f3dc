"""The routed matmul: tokens grouped by expert (a :class:`Routing`'s order), each group times its expert.

Pure functions on tensors; :class:`~.layer.ExpandedLinear` picks one per call.
Expert weights come as ``[K, in, out]`` (the materialized layout, or a
transposed view of unpacked ``[K, out, in]`` experts). Three ways, one result
(``tests/test_routed_forward.py`` checks each against a per-token loop):

- :func:`grouped_matmul`: torch's grouped GEMM (``F.grouped_mm``) with the
  group ends computed on the device: no host round trip at all. Used wherever
  the build runs it natively (:func:`grouped_mm_usable`).
- :func:`padded_matmul`: one ``bmm`` over groups zero-padded to the largest
  group. Its shape needs the largest count on the host (one sync per call);
  a capacity of every token (no sync) would cost K times the FLOPs and memory,
  more than the sync saves. The fallback on an accelerator without grouped GEMM
  (per-expert ``mm`` when padding would more than double the work).
- :func:`per_token_matmul`: each token times its own expert's weight (a batched
  matrix-vector product). For calls with fewer tokens than experts (decoding):
  it touches one weight per token instead of all K, and needs no grouping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_expansion_plugin.sparse_expansion.router import Routing

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(t: Tensor) -> bool:
    """Grouped GEMM's layout rule: every non-unit stride and the start a multiple of 16 bytes."""
    size = t.element_size()
    strides = [s for s in t.stride() if s != 1]
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in strides) and 1 in t.stride()


def grouped_mm_usable(grouped: Tensor, weights: Tensor) -> bool:
    """Whether :func:`grouped_matmul` runs natively for these operands (feature-detected, no probe call).

    CUDA: the kernels are bfloat16 on compute capability 8.0 or newer (torch's
    documented support); other dtypes would take torch's per-group fallback,
    which reads the offsets on the host. CPU: torch's fallback loops over groups
    in C++ (measured as fast as a Python loop of ``mm``: 64 vs 65 ms for 2048
    tokens, 16 experts of 1536 x 576) and takes every float dtype.
    """
    if _GROUPED_MM is None or grouped.dtype != weights.dtype or grouped.device != weights.device:
        return False
    if grouped.device.type == "cuda":
        if grouped.dtype != torch.bfloat16 or torch.cuda.get_device_capability(grouped.device) < (8, 0):
            return False
    elif grouped.device.type != "cpu":
        return False
    return _aligned(grouped) and _aligned(weights)


def grouped_matmul(grouped: Tensor, weights: Tensor, routing: Routing) -> Tensor:
    """``grouped [T, in]`` (rows in expert order) times ``weights [K, in, out]`` per group: ``[T, out]``."""
    assert _GROUPED_MM is not None  # callers check grouped_mm_usable
    return _GROUPED_MM(grouped, weights, offs=routing.group_ends)


def padded_matmul(grouped: Tensor, weights: Tensor, routing: Routing) -> Tensor:
    """As :func:`grouped_matmul` without grouped GEMM: one host read of the counts, then one ``bmm``.

    The ``bmm`` runs over groups zero-padded to the largest; when padding would
    more than double the rows (unbalanced clusters: one expert holding a third
    of the tokens pads K/3 times the input), one ``mm`` per used expert instead.
    """
    counts = routing.host_counts  # the one sync: the padded shape needs the largest count
    num_experts, tokens = weights.shape[0], grouped.shape[0]
    if num_experts * max(counts) > 2 * tokens:
        parts, start = [], 0
        for k, count in enumerate(counts):
            if count:
                parts.append(grouped[start : start + count] @ weights[k])
                start += count
        return torch.cat(parts)
    expert = routing.sorted_assignment  # [T]: each grouped row's expert
    slot = torch.arange(tokens, device=grouped.device) - routing.group_starts.index_select(0, expert)
    padded = grouped.new_zeros(num_experts, max(counts), grouped.shape[1])
    padded[expert, slot] = grouped
    return torch.bmm(padded, weights)[expert, slot]


def per_token_matmul(flat: Tensor, weights: Tensor) -> Tensor:
    """``flat [T, in]`` row t times ``weights[t] [in, out]`` (each token's own expert): ``[T, out]``."""
    return torch.bmm(flat.unsqueeze(1), weights).squeeze(1)
