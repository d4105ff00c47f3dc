"""Per-cluster Hessians for Sparse Expansion, with the rules that keep small clusters from overfitting.

Why here and not in ``pruning/``: the solver only needs ``[K, n, n]`` Hessians;
how they are built from clustered tokens (and pulled toward the layer's
global Hessian, or replaced by it for tiny clusters) is Sparse Expansion's
business.

Why streaming: the Hessians are accumulated batch by batch as calibration
inputs pass (:class:`StreamingClusterHessians`), so memory is ``O(K n^2)``
whatever the number of calibration tokens; nothing needs to keep the inputs.
With one expert the shared ``accumulate_hessian`` is used, so one cluster
holding every token reproduces stock SparseGPT's Hessian operation for operation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_expansion_plugin.pruning.sparsegpt import SGPT_PRECISION, accumulate_hessian

logger = logging.getLogger(__name__)

SMALL_CLUSTER_RULES = ("global", "dampen", "merge")


@dataclass
class ClusterHessians:
    """Hessians of K clusters and of all tokens, in llm-compressor's ``2/N sum x x^T`` convention.

    hessians: ``[K, n, n]``; samples: ``[K]`` batch-row counts (the convention's N:
    the batch rows that held at least one of the cluster's tokens);
    tokens: ``[K]`` tokens routed to each cluster; global_*: the same for all tokens together;
    token_weights: ``[K]`` the tokens' total weight in each Hessian when tokens were shared
    between two clusters (soft Hessians), else None (each token weighs 1 in its own cluster).
    """

    hessians: Tensor
    samples: list[int]
    tokens: list[int]
    global_hessian: Tensor
    global_samples: int
    global_tokens: int
    notes: list[str] = field(default_factory=list)
    token_weights: list[float] | None = None

    def weight(self, k: int) -> float:
        """How many tokens' worth of ``x x^T`` cluster ``k``'s Hessian holds (its token count when hard)."""
        return float(self.tokens[k]) if self.token_weights is None else self.token_weights[k]

    def per_token(self, k: int | None = None) -> Tensor:
        """Hessian ``[n, n]`` of cluster ``k`` (or the global one) as a mean ``E[x x^T]`` over its tokens."""
        if k is None:
            return self.global_hessian * (self.global_samples / (2.0 * max(self.global_tokens, 1)))
        if self.token_weights is None:
            return self.hessians[k] * (self.samples[k] / (2.0 * max(self.tokens[k], 1)))
        return self.hessians[k] * (self.samples[k] / (2.0 * max(self.token_weights[k], 1e-12)))


def second_choice_shares(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's nearest and second-nearest cluster and the gap between them, from router scores.

    scores: ``[T, K]`` (K >= 2) as :meth:`ExpertRouter.scores` gives them, ``||z||^2 - ||z - c_k||^2``
    in the router's PCA space; so ``scores[first] - scores[second]`` is ``d_2^2 - d_1^2 >= 0``,
    the gap between the two squared distances. ``first`` is the router's argmax (the expert the
    token is routed to at inference). Returns ``(first [T], second [T], gap [T])``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"second choices need scores [tokens, K >= 2], got {tuple(scores.shape)}")
    first = scores.argmax(dim=1)
    others = scores.scatter(1, first[:, None], float("-inf"))
    second = others.argmax(dim=1)
    gap = scores.gather(1, first[:, None]).squeeze(1) - scores.gather(1, second[:, None]).squeeze(1)
    return first, second, gap


def soft_share(gap: Tensor, median_gap: float, scale: float) -> Tensor:
    """Share of a token counted in its second-nearest cluster: ``sigmoid(-gap / (scale x median_gap))``.

    Why: a cluster Hessian from few tokens overfits them (measured: an expert closes much more of its
    error on calibration tokens than on held-out ones). A token near the border between two clusters
    is evidence for both, so it is counted in both, half and half at the border and less the farther
    it lies from it (27% at the median gap when ``scale`` is 1). Routing at inference stays hard.
    median_gap: the median gap of the router's fit sample, so ``scale`` is free of the layer's units.
    """
    if not scale > 0:
        raise ValueError(f"soft Hessian scale must be > 0, got {scale}")
    width = max(float(median_gap), torch.finfo(torch.float32).tiny) * scale
    return torch.sigmoid(-gap.to(torch.float32) / width)


class StreamingClusterHessians:
    """Accumulates the K cluster Hessians and the global one batch by batch, in ``O(K n^2)`` memory.

    Each :meth:`add` sorts the batch's tokens by expert once and adds one
    ``X_k^T X_k`` per cluster present (float32, ``SGPT_PRECISION``, as stock
    SparseGPT) to a running Gram matrix; :meth:`result` scales them to
    llm-compressor's ``2/N X_k^T X_k``. Why Gram sums and not stock's rescale
    per batch: one scaling at the end costs K fewer ``n x n`` passes per batch
    and gives the same Hessian to float tolerance. With one expert, stock's
    ``accumulate_hessian`` is called instead, so the result is bit-for-bit stock's.

    num_experts: K >= 1; dim: the input width n; device: where the ``[K, n, n]``
    accumulators live (each batch is moved there).
    """

    def __init__(self, num_experts: int, dim: int, device: torch.device | str | None = None) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.num_experts = num_experts
        self.dim = dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # K = 1: stock's running Hessian; K > 1: running X_k^T X_k
        self._sums = torch.zeros(num_experts, dim, dim, dtype=SGPT_PRECISION, device=self.device)
        self._samples = torch.zeros(num_experts, dtype=torch.long, device=self.device)
        self._tokens = torch.zeros(num_experts, dtype=torch.long, device=self.device)
        self._weights = torch.zeros(num_experts, dtype=torch.float64, device=self.device)
        self._soft = False  # whether any token was shared with a second cluster
        self._stock_samples = 0  # K = 1 only: accumulate_hessian's running count
        self.global_samples = 0
        self.global_tokens = 0
        self.batches = 0

    def add(
        self,
        inputs: Tensor,
        assignment: Tensor | None = None,
        second: Tensor | None = None,
        second_share: Tensor | None = None,
    ) -> None:
        """Add one captured batch ``inputs [batch, seq, n]`` or ``[tokens, n]`` (a 2-D input is one sample).

        assignment: ``[tokens]`` expert index of each token in flattened order
        (``inputs.reshape(-1, n)``); may be omitted when K == 1.
        second / second_share: soft Hessians (K > 1): each token also adds ``share x x^T`` to cluster
        ``second`` and only ``(1 - share) x x^T`` to its own (``[tokens]`` each, share in [0, 1]).
        """
        if inputs.dim() not in (2, 3) or inputs.shape[-1] != self.dim:
            raise ValueError(
                f"inputs must be [batch, seq, {self.dim}] or [tokens, {self.dim}], got {tuple(inputs.shape)}"
            )
        rows = inputs.shape[0] if inputs.dim() == 3 else 1
        num_tokens = inputs.numel() // self.dim
        if assignment is None:
            if self.num_experts != 1:
                raise ValueError(f"an assignment is required with {self.num_experts} experts")
            assignment = torch.zeros(num_tokens, dtype=torch.long)
        assignment = self._checked_assignment(assignment, num_tokens)
        if (second is None) != (second_share is None):
            raise ValueError("soft Hessians need both `second` and `second_share`, or neither")
        if second is not None and second_share is not None:
            if self.num_experts == 1:
                raise ValueError("soft Hessians need at least two experts; one expert has no second choice")
            second = self._checked_assignment(second, num_tokens)
            second_share = second_share.reshape(-1)
            if not second_share.is_floating_point() or second_share.shape[0] != num_tokens:
                raise ValueError(
                    f"second_share must hold {num_tokens} floating-point shares, got "
                    f"{tuple(second_share.shape)} of {second_share.dtype}"
                )
            if num_tokens and not bool(((second_share >= 0) & (second_share <= 1)).all()):
                raise ValueError(
                    "second_share must lie in [0, 1] (the share of a token in its second cluster)"
                )
        self.global_samples += rows
        self.global_tokens += num_tokens
        self.batches += 1
        if self.num_experts == 1:  # stock SparseGPT's accumulation, operation for operation
            self._sums[0], self._stock_samples = accumulate_hessian(
                inputs, self._sums[0], self._stock_samples
            )
            self._tokens[0] += num_tokens
            return
        if num_tokens == 0:
            return
        flat = inputs.reshape(-1, self.dim).to(device=self.device)
        assignment = assignment.to(self.device)
        second = second.to(self.device) if second is not None else None
        # batch rows holding cluster k: mark (row, k) pairs, no K boolean masks over the tokens
        row_of_token = torch.arange(num_tokens, device=self.device) // (num_tokens // rows)
        present = torch.zeros(rows, self.num_experts, dtype=torch.bool, device=self.device)
        present[row_of_token, assignment] = True
        if second is not None:
            present[row_of_token, second] = True
        self._samples += present.sum(dim=0)
        counts_tensor = torch.bincount(assignment, minlength=self.num_experts)
        self._tokens += counts_tensor
        if second is None or second_share is None:
            self._weights += counts_tensor
            order = torch.argsort(assignment, stable=True)
            grouped = flat.index_select(0, order).to(SGPT_PRECISION)
        else:  # each token twice: sqrt(1 - s) x into its own cluster's sum, sqrt(s) x into the second's
            self._soft = True
            share = second_share.to(device=self.device, dtype=torch.float64)
            labels = torch.cat([assignment, second])
            weights = torch.cat([1.0 - share, share])
            self._weights.index_add_(0, labels, weights)
            counts_tensor = torch.bincount(labels, minlength=self.num_experts)
            order = torch.argsort(labels, stable=True)
            scaled = flat.to(SGPT_PRECISION).repeat(2, 1) * weights.sqrt().to(SGPT_PRECISION)[:, None]
            grouped = scaled.index_select(0, order)
        start = 0
        for k, count in enumerate(counts_tensor.tolist()):
            if count:
                part = grouped[start : start + count]
                self._sums[k].addmm_(part.t(), part)
                start += count

    def _checked_assignment(self, assignment: Tensor, num_tokens: int) -> Tensor:
        if assignment.is_floating_point() or assignment.is_complex() or assignment.dtype == torch.bool:
            raise ValueError(f"assignment must hold integer expert indices, got dtype {assignment.dtype}")
        assignment = assignment.reshape(-1).long()
        if assignment.shape[0] != num_tokens:
            raise ValueError(f"{assignment.shape[0]} assignments for {num_tokens} tokens in this batch")
        if num_tokens:
            low, high = int(assignment.min()), int(assignment.max())
            if low < 0 or high >= self.num_experts:
                raise ValueError(
                    f"assignment holds expert indices outside [0, {self.num_experts}): min {low}, max {high}"
                )
        return assignment

    def result(self) -> ClusterHessians:
        """The accumulated :class:`ClusterHessians` (new tensors; accumulation may continue afterwards)."""
        tokens = [int(t) for t in self._tokens.tolist()]
        if self.num_experts == 1:
            hessians = self._sums.clone()
            return ClusterHessians(
                hessians,
                [self._stock_samples],
                tokens,
                hessians[0].clone(),
                self.global_samples,
                self.global_tokens,
            )
        samples = [int(s) for s in self._samples.tolist()]
        scale = torch.tensor(
            [2.0 / s if s else 0.0 for s in samples], dtype=SGPT_PRECISION, device=self.device
        )
        hessians = self._sums * scale[:, None, None]
        # the clusters partition the tokens: X^T X = sum_k X_k^T X_k, no second pass over X
        global_h = self._sums.sum(dim=0) * (2.0 / max(self.global_samples, 1))
        weights = [float(w) for w in self._weights.tolist()] if self._soft else None
        return ClusterHessians(
            hessians,
            samples,
            tokens,
            global_h,
            self.global_samples,
            self.global_tokens,
            token_weights=weights,
        )


def cluster_hessians(
    batches: Sequence[Tensor],
    assignments: Sequence[Tensor],
    num_experts: int,
    device: torch.device | str | None = None,
) -> ClusterHessians:
    """Accumulate the Hessian of every cluster and the global one in one pass over the batches.

    A wrapper over :class:`StreamingClusterHessians` for inputs already in memory.
    batches: each ``[batch, seq, n]`` or ``[tokens, n]`` as captured by a forward hook.
    assignments: each ``[tokens]`` expert index of that batch's tokens (flattened order).
    device: where to accumulate (default: the first batch's device); batches are moved one at a time.
    """
    if len(batches) != len(assignments):
        raise ValueError(f"{len(batches)} input batches but {len(assignments)} assignments")
    if not batches:
        raise ValueError("no input batches: run calibration data through the layer first")
    device = device if device is not None else batches[0].device
    stream = StreamingClusterHessians(num_experts, batches[0].shape[-1], device)
    for batch, assignment in zip(batches, assignments, strict=True):
        stream.add(batch, assignment)
    return stream.result()


def regularized_hessians(
    stats: ClusterHessians,
    shrinkage: float = 0.0,
    min_cluster_tokens: int = 0,
    small_cluster_rule: str = "global",
    small_cluster_dampening: float = 0.1,
    prior_tokens: float = 0.0,
) -> tuple[Tensor, list[str]]:
    """The ``[K, n, n]`` Hessians to prune with, and log lines saying which rule touched which cluster.

    prior_tokens ``tau >= 0`` (the recommended knob): a count-based prior toward the layer,
        ``H_k <- (n_k E_k[x x^T] + tau E[x x^T]) / (n_k + tau)`` with ``n_k`` the cluster's
        tokens, so a cluster of few tokens leans on the layer's Hessian and a large one keeps
        its own (``tau`` acts as that many pseudo-tokens of the layer). Why: a cluster with
        fewer tokens than input dimensions has a rank-deficient Hessian; a fixed shrinkage
        pulls every cluster equally, large or small. 0 leaves ``H_k`` bit-for-bit as accumulated.
    shrinkage ``lam`` in [0, 1]: ``H_k <- (1 - lam) E_k[x x^T] + lam E[x x^T]`` (per-token means,
        so a cluster's scale does not matter); 0 leaves ``H_k`` bit-for-bit as accumulated.
        Use one of ``shrinkage`` and ``prior_tokens``, not both.
    min_cluster_tokens / small_cluster_rule: a cluster with fewer tokens uses the
        global Hessian (``global``, its expert is then plain SparseGPT's) or gets
        ``small_cluster_dampening * mean(diag)`` more dampening (``dampen``, after the
        prior or shrinkage). ``merge`` is applied before (the modifier re-routes those
        tokens), so here it acts as ``global`` for anything still small. An empty
        cluster always uses the global Hessian.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"hessian_shrinkage must lie in [0, 1], got {shrinkage}")
    if not prior_tokens >= 0.0:  # also rejects NaN
        raise ValueError(
            f"prior_tokens (tau, in tokens) must be >= 0, got {prior_tokens}; use 0 for no prior"
        )
    if shrinkage > 0 and prior_tokens > 0:
        raise ValueError(
            f"hessian_shrinkage={shrinkage} and prior_tokens={prior_tokens} both pull clusters toward the "
            "layer's Hessian: set one of them and leave the other at 0 (prior_tokens is recommended)"
        )
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

    # one expert: its Hessian is the layer's, so the prior changes nothing and stock's is kept as is
    use_prior = prior_tokens > 0 and num_experts > 1

    def pulled(k: int) -> Tensor:
        """Cluster k's per-token Hessian after the prior or the shrinkage."""
        own = stats.per_token(k)
        if use_prior:
            count = stats.weight(k)  # soft Hessians: the tokens' total weight in this cluster
            return (count * own + prior_tokens * global_hessian(k)) / (count + prior_tokens)
        if shrinkage > 0:
            return (1 - shrinkage) * own + shrinkage * global_hessian(k)
        return own

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
            mean = pulled(k)
            extra = small_cluster_dampening * mean.diagonal().mean()
            out[k] = mean + extra * torch.eye(mean.shape[0], dtype=mean.dtype, device=mean.device)
            notes.append(
                f"expert {k}: {count} tokens < {min_cluster_tokens}, dampening +{small_cluster_dampening:g} x mean diag"
            )
            continue
        if shrinkage > 0 or use_prior:
            out[k] = pulled(k)
    return out, notes
