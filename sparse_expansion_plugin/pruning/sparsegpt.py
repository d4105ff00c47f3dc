"""SparseGPT as pure tensor functions: batched over experts, with per-row sparsity targets.

Why our own solver: llm-compressor's ``sparsify_weight`` prunes one module with
one Hessian and one sparsity for the whole layer. Sparse Expansion needs K
pruned copies of a weight, one per cluster Hessian, solved as batched tensor
ops; WD-aware SparseGPT needs a different number of zeros per output row. With
a float ``sparsity`` and no batching, :func:`sparsegpt_prune` is a line-by-line
mirror of llm-compressor 0.14.0.1's ``sgpt_sparsify.sparsify_weight`` (dead
columns, dampening, Cholesky inverse, lazy block updates, per-block threshold,
N:M rule), so it gives the same masks and the same weights to float tolerance;
``tests/test_sparsegpt_solver.py`` checks that against the stock function.

Shapes: ``E`` experts (batch), ``out`` rows, ``n`` input columns.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from sparse_expansion_plugin.pruning.structure import check_prune_nm

logger = logging.getLogger(__name__)

SGPT_PRECISION = torch.float32
"""Precision of Hessians and solves, as in llm-compressor."""

MAX_DAMPENING_RETRIES = 6
"""How many times an expert whose Hessian is not positive definite gets 10x more dampening."""


def accumulate_hessian(inputs: Tensor, hessian: Tensor, num_samples: int) -> tuple[Tensor, int]:
    """Add a batch of a Linear's inputs to its running Hessian ``H = 2/N * sum x x^T``.

    Same convention as llm-compressor's ``accumulate_hessian`` for Linear
    layers: ``num_samples`` counts *batch rows* (dataset samples), not tokens,
    so ``H`` is ``2/num_samples * X^T X`` over all tokens seen so far.

    inputs: ``[batch, seq, n]`` or ``[tokens, n]`` (a 2-D input is one sample).
    hessian: ``[n, n]`` float32, updated in place and returned with the new count.
    """
    inputs = inputs.to(device=hessian.device)
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)
    num_added = inputs.shape[0]
    x = inputs.reshape(-1, inputs.shape[-1]).t()
    hessian *= num_samples / (num_samples + num_added)
    num_samples += num_added
    x = math.sqrt(2 / num_samples) * x.to(dtype=SGPT_PRECISION)
    hessian += x.matmul(x.t())
    return hessian, num_samples


def _upper_cholesky_of_inverse(hessian: Tensor, dampening_frac: float) -> Tensor:
    """Dampen ``H`` [E, n, n] in place and return ``chol(H^-1)`` upper [E, n, n], as the stock solver.

    An expert whose Hessian is not positive definite is retried alone with 10x,
    100x, ... the dampening (logged) instead of failing the whole layer; if that
    never works it falls back to the identity, like llm-compressor does.
    """
    diag = torch.arange(hessian.shape[-1], device=hessian.device)
    damp = dampening_frac * hessian.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # [E]
    hessian[:, diag, diag] += damp[:, None]  # no undamped copy: E x n x n floats, only the slow path needs it
    chol, info = torch.linalg.cholesky_ex(hessian)
    if bool((info == 0).all()):
        inv = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(inv, upper=True)
        if bool((info == 0).all()):
            return upper
    # Slow path: solve experts one at a time, with more dampening for the failures.
    out = torch.empty_like(hessian)
    for e in range(hessian.shape[0]):
        factor = 1.0
        for attempt in range(MAX_DAMPENING_RETRIES + 1):
            h = hessian[e].clone()  # already dampened once
            h[diag, diag] += (factor - 1.0) * damp[e]
            chol, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                out[e] = upper
                if attempt:
                    logger.warning(
                        "expert %d: Hessian not positive definite; solved with %.0fx dampening "
                        "(dampening_frac %.3g)",
                        e,
                        factor,
                        dampening_frac * factor,
                    )
                break
            factor *= 10.0
        else:
            logger.warning(
                "expert %d: Hessian not invertible even with %.0fx dampening; using the identity "
                "(magnitude pruning) as llm-compressor does. Use more calibration samples.",
                e,
                factor / 10.0,
            )
            out[e] = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    return out


SUB_BLOCK_COLUMNS = 16
"""Columns per inner lazy-update step of the solver (rounded up to a multiple of M for N:M)."""


def _sub_block_size(prune_m: int) -> int:
    """Inner step: ``SUB_BLOCK_COLUMNS``, a whole number of N:M groups (a group must be up to date)."""
    if prune_m <= 0:
        return SUB_BLOCK_COLUMNS
    return prune_m * max(1, SUB_BLOCK_COLUMNS // prune_m)


def _rows_zero_counts(sparsity: Tensor, num_experts: int, num_rows: int, num_columns: int) -> Tensor:
    """Per-row fractions ``[out]`` or ``[E, out]`` -> exact zero counts ``[E, out]`` int64."""
    if sparsity.dim() == 1:
        sparsity = sparsity.unsqueeze(0)
    if sparsity.shape[-1] != num_rows or sparsity.shape[0] not in (1, num_experts) or sparsity.dim() != 2:
        raise ValueError(
            f"per-row sparsity must have shape [{num_rows}] or [{num_experts}, {num_rows}], "
            f"got {tuple(sparsity.shape)}"
        )
    if bool(((sparsity < 0) | (sparsity >= 1)).any()) or not bool(torch.isfinite(sparsity).all()):
        raise ValueError("per-row sparsity fractions must lie in [0, 1)")
    counts = torch.round(sparsity.double() * num_columns).to(torch.int64)
    return counts.expand(num_experts, num_rows).clone()


def _weights(weight: Tensor | None, num_experts: int, size: int, name: str, like: Tensor) -> Tensor | None:
    """Validate positive per-row/column factors ``[size]`` or ``[E, size]`` -> ``[E, size, 1]``."""
    if weight is None:
        return None
    weight = weight.to(device=like.device, dtype=like.dtype)
    if weight.dim() == 1:
        weight = weight.unsqueeze(0)
    if weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] not in (1, num_experts):
        raise ValueError(
            f"{name} must have shape [{size}] or [{num_experts}, {size}], got {tuple(weight.shape)}"
        )
    if not bool((weight > 0).all()) or not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} must be finite and positive")
    return weight.expand(num_experts, size).unsqueeze(-1)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | Tensor = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    *,
    row_weight: Tensor | None = None,
    column_weight: Tensor | None = None,
    num_zeros: Tensor | int | None = None,
    fixed_pruned: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` with SparseGPT given its input Hessian; return (pruned weight, keep mask).

    weight: ``[out, n]`` (one weight for all experts) or ``[E, out, n]``.
    hessian: ``[n, n]`` or ``[E, n, n]`` (as accumulated by :func:`accumulate_hessian`;
        not modified). The E solves run as batched tensor ops.
    sparsity: a float applies llm-compressor's rule exactly: in each block of
        ``block_size`` columns, prune every weight whose saliency
        ``w^2 / [H^-1]_cc^2`` is at most the ``int(numel * sparsity)``-th smallest
        of the block (so ``int(numel*s)+1`` per block, ties aside). A tensor
        ``[out]`` or ``[E, out]`` of per-row fractions gives row ``r`` exactly
        ``round(frac_r * n)`` zeros, spread evenly over the blocks (cumulative
        count through column ``c`` is ``floor(k_r * c / n)``) and chosen within
        each block by the same saliency.
    prune_n, prune_m: N:M structure as llm-compressor's ``mask_structure "N:M"``:
        ``prune_n`` zeros in every group of ``prune_m`` consecutive columns
        (``sparsity`` is then ignored, as upstream). ``0, 0`` is unstructured.
    row_weight: ``[out]`` or ``[E, out]`` positive factors on each row's saliency
        (keyword only). The mask then minimises the *weighted* output error
        ``sum_r row_weight_r * ||dy_r||^2``: the OBS update of a row does not
        depend on its weight, only which weights of a block are pruned does, so
        heavier rows lose fewer weights while each block still loses exactly the
        stock count. No effect on per-row fractions or N:M (both fix each row).
    column_weight: ``[n]`` or ``[E, n]`` positive factors on each input column's
        saliency; with N:M this decides which weights survive in each group.
    num_zeros: ``int`` or ``[E]`` exact number of zeros per expert, used instead
        of a float ``sparsity``: spread over the blocks by column count
        (cumulative ``floor(K * c / n)``) and chosen in each block by the stock
        block-wide saliency rule. Lets a caller hit an exact total.
    fixed_pruned: bool ``[out, n]`` or ``[E, out, n]``, True where a weight must be
        pruned: the mask is given, not chosen (``sparsity`` and N:M are then
        ignored), and only the OBS updates of the kept weights are solved. Lets
        experts share one mask and differ only in their values.
    Returns ``(weight, keep)`` of shape ``[E, out, n]`` if ``weight`` or ``hessian``
    is batched, else ``[out, n]``; ``weight`` keeps the input dtype, ``keep`` is bool.
    """
    batched = weight.dim() == 3 or hessian.dim() == 3
    if weight.dim() not in (2, 3) or hessian.dim() not in (2, 3):
        raise ValueError(
            f"weight must be [out, n] or [E, out, n] and hessian [n, n] or [E, n, n]; "
            f"got {tuple(weight.shape)} and {tuple(hessian.shape)}"
        )
    check_prune_nm(prune_n, prune_m)
    out_dtype = weight.dtype
    W = weight.to(dtype=SGPT_PRECISION)
    H = hessian.to(device=W.device, dtype=SGPT_PRECISION)
    if W.dim() == 2:
        W = W.unsqueeze(0)
    if H.dim() == 2:
        H = H.unsqueeze(0)
    num_experts = max(W.shape[0], H.shape[0])
    if W.shape[0] not in (1, num_experts) or H.shape[0] not in (1, num_experts):
        raise ValueError(f"expert counts differ: weight {W.shape[0]}, hessian {H.shape[0]}")
    # one private copy each (the caller's tensors are never modified)
    W = W.expand(num_experts, -1, -1).clone()
    H = H.expand(num_experts, -1, -1).clone()
    _, num_rows, num_columns = W.shape
    if H.shape[-1] != num_columns or H.shape[-2] != num_columns:
        raise ValueError(f"hessian is {tuple(H.shape[-2:])} but weight has {num_columns} input columns")

    row_counts = None
    zeros_total = None
    if num_zeros is not None:
        if prune_n or isinstance(sparsity, Tensor):
            raise ValueError(
                "num_zeros replaces a float sparsity; it cannot be combined with N:M or per-row fractions"
            )
        zeros_total = torch.as_tensor(num_zeros, dtype=torch.int64, device=W.device).reshape(-1)
        zeros_total = zeros_total.expand(num_experts).clone()
        if bool(((zeros_total < 0) | (zeros_total > num_rows * num_columns)).any()):
            raise ValueError(f"num_zeros must lie in [0, {num_rows * num_columns}], got {num_zeros}")
    if isinstance(sparsity, Tensor):
        if prune_n:
            raise ValueError("per-row sparsity cannot be combined with N:M structure (N:M fixes every row)")
        row_counts = _rows_zero_counts(sparsity.to(W.device), num_experts, num_rows, num_columns)
    elif zeros_total is None and not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")

    # Dead inputs (never active in calibration): weight irrelevant, Hessian made invertible.
    diag = torch.arange(num_columns, device=W.device)
    dead = H[:, diag, diag] == 0  # [E, n]
    H[:, diag, diag] = torch.where(dead, torch.ones_like(H[:, diag, diag]), H[:, diag, diag])
    W.masked_fill_(dead[:, None, :], 0.0)

    row_w = _weights(row_weight, num_experts, num_rows, "row_weight", W)  # [E, out, 1] or None
    col_w = _weights(column_weight, num_experts, num_columns, "column_weight", W)  # [E, n, 1] or None
    if row_w is not None:
        row_w = row_w.transpose(1, 2)  # [E, 1, out]: rows are the last axis in the layout below

    fixed_t = None
    if fixed_pruned is not None:
        if fixed_pruned.shape[-2:] != (num_rows, num_columns):
            raise ValueError(
                f"fixed_pruned is {tuple(fixed_pruned.shape)} but the weight is {num_rows} x {num_columns}"
            )
        fixed_t = fixed_pruned.to(device=W.device, dtype=torch.bool).reshape(-1, num_rows, num_columns)
        fixed_t = fixed_t.expand(num_experts, -1, -1).transpose(1, 2)  # [E, n, out], as the hot loop

    Hinv = _upper_cholesky_of_inverse(H, dampening_frac)
    del H
    # Hot loop layout: the weight transposed to [E, n, out], so that column i of every expert is
    # one contiguous [E, out] slice and the updates below are plain batched GEMMs on contiguous rows.
    Wt = W.transpose(1, 2).contiguous()
    del W
    pruned = torch.zeros_like(Wt, dtype=torch.bool)  # [E, n, out]
    step = _sub_block_size(prune_m)

    for i1 in range(0, num_columns, block_size):
        i2 = min(i1 + block_size, num_columns)
        count = i2 - i1
        W1 = Wt[:, i1:i2]  # a view: the block is solved in place
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        hdiag1 = Hinv1.diagonal(dim1=-2, dim2=-1)[:, :, None]  # [E, count, 1]

        if fixed_t is not None:
            mask1 = fixed_t[:, i1:i2].clone()
        elif prune_n == 0:
            saliency = W1**2 / hdiag1**2  # [E, count, out]
            if row_w is not None:
                saliency = saliency * row_w
            if col_w is not None:
                saliency = saliency * col_w[:, i1:i2]
            if zeros_total is not None:
                k = torch.div(zeros_total * i2, num_columns, rounding_mode="floor") - torch.div(
                    zeros_total * i1, num_columns, rounding_mode="floor"
                )
                flat = saliency.reshape(num_experts, -1)
                # kthvalue is a selection, not a sort: ~5x faster on CPU for the block-wide threshold
                thresh = torch.stack(
                    [torch.kthvalue(flat[e], max(int(k[e]), 1))[0] for e in range(num_experts)]
                )
                mask1 = (saliency <= thresh[:, None, None]) & (k > 0)[:, None, None]
            elif row_counts is None:
                flat = saliency.reshape(num_experts, -1)
                # the stock rule's ``sort(...)[int(numel * s)]``, as a selection (same value, ~5x faster)
                thresh = torch.kthvalue(flat, int(flat.shape[1] * float(sparsity)) + 1, dim=1)[0]
                mask1 = saliency <= thresh[:, None, None]
            else:
                before = torch.div(row_counts * i1, num_columns, rounding_mode="floor")
                upto = torch.div(row_counts * i2, num_columns, rounding_mode="floor")
                order = torch.argsort(saliency, dim=1, stable=True)
                ranks = torch.arange(count, device=Wt.device)[None, :, None].expand_as(order)
                mask1 = torch.zeros_like(saliency, dtype=torch.bool)
                mask1.scatter_(1, order, ranks < (upto - before)[:, None, :])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        # err_i = w_i / [H^-1]_ii on pruned weights, 0 on kept ones: one multiply per column below
        scale = mask1 / hdiag1
        Err1 = torch.empty_like(W1)

        # Two-level lazy updates: inside a sub-block of ``step`` columns the OBS update is a rank-1
        # update of the sub-block's remaining columns only; the rest of the block gets the sub-block's
        # errors in one GEMM. Same sums as the column-by-column stock loop, reassociated: the stock
        # loop streams the whole remaining block ([E, out, <=128]) through memory once per column,
        # which dominated Sparse Expansion's compression time (K experts per linear).
        for j1 in range(0, count, step):
            j2 = min(j1 + step, count)
            for i in range(j1, j2):
                if prune_n != 0 and fixed_t is None and i % prune_m == 0:
                    group = W1[:, i : i + prune_m] ** 2 / hdiag1[:, i : i + prune_m] ** 2
                    if col_w is not None:
                        group = group * col_w[:, i1 + i : i1 + i + prune_m]
                    mask1.scatter_(1, i + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
                    scale[:, i : i + prune_m] = mask1[:, i : i + prune_m] / hdiag1[:, i : i + prune_m]
                err = torch.mul(W1[:, i], scale[:, i], out=Err1[:, i])
                if i + 1 < j2:
                    W1[:, i + 1 : j2].addcmul_(Hinv1[:, i, i + 1 : j2, None], err[:, None, :], value=-1.0)
            if j2 < count:
                W1[:, j2:].baddbmm_(Hinv1[:, j1:j2, j2:].transpose(1, 2), Err1[:, j1:j2], alpha=-1.0)

        W1.masked_fill_(mask1, 0.0)  # column i is final once solved: its pruned weights become zeros
        pruned[:, i1:i2] = mask1
        if i2 < num_columns:
            Wt[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1.0)

    W = Wt.transpose(1, 2).contiguous()
    pruned = pruned.transpose(1, 2).contiguous()
    keep = ~pruned
    W = W.to(out_dtype)
    if not batched:
        return W[0], keep[0]
    return W, keep
