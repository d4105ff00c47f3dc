"""How many zeros each row and each layer gets: pure functions shared by the WD-aware modifier.

Why ranks: the signals we compare (WD, kurtosis, variance, OWL outliers, a
random score) live on very different scales and tails. Mapping every row score
to its rank in ``[-1, 1]`` gives every signal *the same* distribution of
weights, so a comparison at equal zeros isolates which rows a signal picks,
not how extreme its values are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def centered_ranks(scores: Tensor) -> Tensor:
    """Scores ``[n]`` -> ranks mapped linearly onto ``[-1, 1]`` (lowest -1, highest +1), float32.

    Ties are broken by position (stable sort), so the map is a permutation of a
    fixed grid and its mean is exactly 0.
    """
    n = scores.numel()
    if n == 1:
        return torch.zeros(1)
    order = torch.argsort(scores.double().flatten().cpu(), stable=True)
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[order] = torch.linspace(-1.0, 1.0, n)
    return ranks.view(scores.shape)


def row_saliency_weights(scores: Tensor, strength: float) -> Tensor:
    """Row factors ``exp(strength * rank)`` for SparseGPT's saliency, ``[rows]``.

    A row's factor multiplies the OBS cost of pruning any of its weights, so the
    mask minimises ``sum_r w_r ||dy_r||^2``: rows scored highest (most
    entangled) cost up to ``e^strength`` times more, the lowest ``e^-strength``
    times less. ``strength = 0`` gives all ones (stock SparseGPT).
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    return torch.exp(strength * centered_ranks(scores))


def owl_layer_sparsities(scores: Mapping[str, float], sparsity: float, max_shift: float) -> dict[str, float]:
    """OWL's layer rule for any layer score: more score -> fewer zeros, mean kept at ``sparsity``.

    As in Yin et al. 2023 (and llm-compressor's broken ``sparsity_profile: owl``):
    min-max normalise the scores to ``[0, 2 * max_shift]`` and set
    ``s_l = sparsity - (D_l - mean D)``, so every layer stays within
    ``sparsity +- max_shift`` and layers of equal size keep the mean. Equal
    scores give the uniform sparsity.
    """
    names = list(scores)
    values = torch.tensor([float(scores[k]) for k in names], dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("layer scores must be finite")
    spread = float(values.max() - values.min()) if len(values) else 0.0
    if spread == 0.0:
        return dict.fromkeys(names, float(sparsity))
    d = (values - values.min()) / spread * (2.0 * max_shift)
    result = sparsity - (d - d.mean())
    return {k: float(v) for k, v in zip(names, result.clamp(0.0, 0.999), strict=True)}


def exact_zero_budgets(sizes: Sequence[int], fractions: Sequence[float], total: int) -> list[int]:
    """Integer zeros per module summing to exactly ``total``, as close as possible to ``fraction * size``.

    Scales the ideal counts to the total, floors, then gives the remaining
    zeros to the largest remainders (Hamilton's method). Each budget stays
    within ``[0, size]``.
    """
    if len(sizes) != len(fractions):
        raise ValueError("sizes and fractions must have the same length")
    capacity = sum(sizes)
    if not 0 <= total <= capacity:
        raise ValueError(f"total zeros {total} must lie in [0, {capacity}]")
    ideal = [f * s for f, s in zip(fractions, sizes, strict=True)]
    ideal_sum = sum(ideal)
    scale = total / ideal_sum if ideal_sum > 0 else 0.0
    ideal = [min(float(s), x * scale) for x, s in zip(ideal, sizes, strict=True)]
    budgets = [math.floor(x) for x in ideal]
    # Hand out what is left to the largest remainders; loop covers the case where capping made room short.
    while sum(budgets) != total:
        short = total - sum(budgets)
        step = 1 if short > 0 else -1
        order = sorted(range(len(sizes)), key=lambda i: (ideal[i] - budgets[i]) * step, reverse=True)
        changed = False
        for i in order:
            if short == 0:
                break
            if 0 <= budgets[i] + step <= sizes[i]:
                budgets[i] += step
                short -= step
                changed = True
        if not changed:  # pragma: no cover - impossible given the range check above
            raise RuntimeError("could not distribute zero budgets")
    return budgets


def stock_zero_count(rows: int, columns: int, sparsity: float, block_size: int) -> int:
    """Zeros llm-compressor's SparseGPT puts in a ``[rows, columns]`` weight at a float sparsity.

    Its mask keeps every saliency ``<=`` the ``int(numel * s)``-th smallest of
    each block, so each block loses ``int(rows * width * s) + 1`` weights
    (exact ties aside). This is the total the WD-aware modifier must match.
    """
    total = 0
    for start in range(0, columns, block_size):
        width = min(block_size, columns - start)
        total += min(int(rows * width * sparsity) + 1, rows * width)
    return total


def owl_outlier_scores(weight: Tensor, input_sq_sum: Tensor) -> Tensor:
    """OWL's score of every weight, ``|W_ij| * ||X_j||``: ``[out, in]`` float32 on the CPU.

    weight: ``[out, in]``; input_sq_sum: ``[in]``, the sum over tokens of
    ``x_j^2`` (or anything proportional to it, such as the Hessian diagonal:
    outliers are counted against the mean, so a common factor cancels).
    """
    return weight.detach().abs().float().cpu() * input_sq_sum.detach().float().cpu().sqrt()[None, :]


def owl_outlier_share(scores: Tensor, threshold: float, dim: int | None = None) -> Tensor:
    """OWL's outlier count: the share of ``scores`` above ``threshold`` x their mean (over *all* scores).

    ``dim=None``: one share for the whole tensor (a scalar tensor); ``dim=1``:
    per row of ``[out, in]`` scores (``[out]``); ``dim=0``: per column (``[in]``).
    """
    outliers = (scores > threshold * scores.mean()).float()
    return outliers.mean() if dim is None else outliers.mean(dim=dim)


def owl_layer_outlier_ratio(members: Iterable[tuple[Tensor, Tensor]], threshold: float) -> float:
    """OWL's outlier ratio of one decoder layer, from ``(weight [out, in], input_sq_sum [in])`` per module.

    All weights of the layer's modules are counted against one mean, as OWL
    (Yin et al. 2023) and llm-compressor's ``sparsity_profile: owl`` do.
    """
    scores = [owl_outlier_scores(weight, sq).flatten() for weight, sq in members]
    if not scores:
        raise ValueError("a layer needs at least one module to count OWL outliers")
    return float(owl_outlier_share(torch.cat(scores), threshold))
