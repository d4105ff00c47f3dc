"""Per-cluster Hessians for Sparse Expansion, with the rules that keep small clusters from overfitting.

Why here and not in ``pruning/``: the solver only needs ``[K, n, n]`` Hessians;
how they are built from clustered tokens (and shrunk toward the layer's
global Hessian, or replaced by it for tiny clusters) is Sparse Expansion's
business. Accumulation uses the shared ``accumulate_hessian`` batch by batch,
so one cluster holding every token reproduces stock SparseGPT's Hessian
operation for operation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_expansion_plugin.pruning.sparsegpt import SGPT_PRECISION, accumulate_hessian

logger = logging.getLogger(__name__)

SMALL_CLUSTER_RULES = ("global", "dampen", "merge")


@dataclass
class ClusterHessians:
    """Hessians of K clusters and of all tokens, in llm-compressor's ``2/N sum x x^T`` convention.

    hessians: ``[K, n, n]``; samples: ``[K]`` batch-row counts (the convention's N);
    tokens: ``[K]`` tokens per cluster; global_*: the same for all tokens together.
    """

    hessians: Tensor
    samples: list[int]
    tokens: list[int]
    global_hessian: Tensor
    global_samples: int
    global_tokens: int
    notes: list[str] = field(default_factory=list)

    def per_token(self, k: int | None = None) -> Tensor:
        """Hessian ``[n, n]`` of cluster ``k`` (or the global one) as a mean ``E[x x^T]`` over its tokens."""
        if k is None:
            return self.global_hessian * (self.global_samples / (2.0 * max(self.global_tokens, 1)))
        return self.hessians[k] * (self.samples[k] / (2.0 * max(self.tokens[k], 1)))


def cluster_hessians(
    batches: list[Tensor],
    assignments: list[Tensor],
    num_experts: int,
    device: torch.device | str | None = None,
) -> ClusterHessians:
    """Accumulate the Hessian of every cluster and the global one in one pass over the batches.

    batches: each ``[batch, seq, n]`` or ``[tokens, n]`` as captured by a forward hook.
    assignments: each ``[tokens]`` expert index of that batch's tokens (flattened order).
    device: where to accumulate (default: the batches' device); batches are moved one at a time.
    """
    if len(batches) != len(assignments):
        raise ValueError(f"{len(batches)} input batches but {len(assignments)} assignments")
    n = batches[0].shape[-1]
    device = torch.device(device) if device is not None else batches[0].device
    hessians = torch.zeros(num_experts, n, n, dtype=SGPT_PRECISION, device=device)
    samples = [0] * num_experts
    tokens = [0] * num_experts
    global_samples = 0
    global_tokens = 0
    if num_experts == 1:  # stock SparseGPT's accumulation, batch by batch, operation for operation
        for batch in batches:
            batch = batch.to(device)
            hessians[0], samples[0] = accumulate_hessian(batch, hessians[0], samples[0])
            tokens[0] += batch.reshape(-1, n).shape[0]
            global_samples += batch.shape[0] if batch.dim() == 3 else 1
        global_tokens = tokens[0]
        return ClusterHessians(hessians, samples, tokens, hessians[0].clone(), global_samples, global_tokens)
    # K > 1: one X_k^T X_k per cluster over all batches (not K x batches small products);
    # samples[k] counts the batches holding cluster k, so H_k = 2 / samples[k] * X_k^T X_k
    # is what accumulating batch by batch would give.
    flat = torch.cat([b.reshape(-1, n) for b in batches]).to(device=device, dtype=SGPT_PRECISION)
    assignment = torch.cat([a.reshape(-1) for a in assignments]).to(device)
    if assignment.shape[0] != flat.shape[0]:
        raise ValueError(f"{assignment.shape[0]} assignments for {flat.shape[0]} tokens")
    for batch, batch_assignment in zip(batches, assignments, strict=True):
        global_samples += batch.shape[0] if batch.dim() == 3 else 1
        for k in torch.unique(batch_assignment).tolist():
            samples[k] += 1
    global_tokens = flat.shape[0]
    order = torch.argsort(assignment, stable=True)
    counts = torch.bincount(assignment, minlength=num_experts).tolist()
    start = 0
    for k, count in enumerate(counts):
        if count:
            rows = flat.index_select(0, order[start : start + count])
            torch.matmul(rows.t(), rows, out=hessians[k])
            hessians[k] *= 2.0 / samples[k]
            tokens[k] = count
            start += count
    # the clusters partition the tokens: X^T X = sum_k X_k^T X_k, no second pass over X
    gram = torch.zeros_like(hessians[0])
    for k in range(num_experts):
        if samples[k]:
            gram += hessians[k] * (samples[k] / 2.0)
    global_h = gram * (2.0 / max(global_samples, 1))
    return ClusterHessians(hessians, samples, tokens, global_h, global_samples, global_tokens)


def regularized_hessians(
    stats: ClusterHessians,
    shrinkage: float = 0.0,
    min_cluster_tokens: int = 0,
    small_cluster_rule: str = "global",
    small_cluster_dampening: float = 0.1,
) -> tuple[Tensor, list[str]]:
    """The ``[K, n, n]`` Hessians to prune with, and log lines saying which rule touched which cluster.

    shrinkage ``lam`` in [0, 1]: ``H_k <- (1 - lam) E_k[x x^T] + lam E[x x^T]`` (per-token means,
        so a cluster's scale does not matter); 0 leaves ``H_k`` bit-for-bit as accumulated.
    min_cluster_tokens / small_cluster_rule: a cluster with fewer tokens uses the
        global Hessian (``global``, its expert is then plain SparseGPT's) or gets
        ``small_cluster_dampening * mean(diag)`` more dampening (``dampen``).
        ``merge`` is applied before (the modifier re-routes those tokens), so here
        it acts as ``global`` for anything still small. An empty cluster always
        uses the global Hessian.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"hessian_shrinkage must lie in [0, 1], got {shrinkage}")
    if small_cluster_rule not in SMALL_CLUSTER_RULES:
        raise ValueError(
            f"small_cluster_rule must be one of {SMALL_CLUSTER_RULES}, got {small_cluster_rule!r}"
        )
    num_experts = stats.hessians.shape[0]
    out = stats.hessians.clone()
    notes: list[str] = []
    # one expert without shrinkage keeps its Hessian as accumulated (stock SparseGPT's), so no global mean
    global_mean = stats.per_token() if (shrinkage > 0 or num_experts > 1) else None

    def global_hessian(k: int) -> Tensor:
        # a single expert's own Hessian *is* the layer's (stock SparseGPT's, scale aside, which the
        # solver does not see): falling back to "the global Hessian" leaves it as accumulated
        return global_mean if global_mean is not None else stats.hessians[k]

    for k in range(num_experts):
        count = stats.tokens[k]
        if count == 0:
            out[k] = global_hessian(k)
            notes.append(f"expert {k}: no calibration tokens, using the global Hessian")
            continue
        if count < min_cluster_tokens:
            if small_cluster_rule in ("global", "merge"):
                out[k] = global_hessian(k)
                notes.append(f"expert {k}: {count} tokens < {min_cluster_tokens}, using the global Hessian")
                continue
            mean = (
                stats.per_token(k)
                if shrinkage <= 0
                else (1 - shrinkage) * stats.per_token(k) + shrinkage * global_hessian(k)
            )
            extra = small_cluster_dampening * mean.diagonal().mean()
            out[k] = mean + extra * torch.eye(mean.shape[0], dtype=mean.dtype, device=mean.device)
            notes.append(
                f"expert {k}: {count} tokens < {min_cluster_tokens}, dampening +{small_cluster_dampening:g} x mean diag"
            )
            continue
        if shrinkage > 0:
            out[k] = (1 - shrinkage) * stats.per_token(k) + shrinkage * global_hessian(k)
    return out, notes
