"""Mapping difficulty (MD) and the output/input (OI) ratios it averages.

Papers' definition: over random pairs of tokens (i, j), input distance
``||x_i - x_j||`` is normalised by its maximum over pairs and each neuron's
output distance ``|y_i - y_j|`` by its median over pairs; a pair's OI ratio is
the ratio of the two, and MD is the mean OI ratio. High MD: the neuron maps
nearby inputs far apart.
"""

from __future__ import annotations

import torch


def sample_token_pairs(num_tokens: int, num_pairs: int, seed: int = 0) -> torch.Tensor:
    """``[num_pairs, 2]`` token indices, all ``2 * num_pairs`` distinct (sampled without replacement)."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    if 2 * num_pairs > num_tokens:
        raise ValueError(
            f"{num_pairs} token pairs need {2 * num_pairs} distinct tokens but only {num_tokens} were given; "
            "pass more tokens or fewer pairs"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_tokens, generator=generator)[: 2 * num_pairs].view(num_pairs, 2)


def oi_ratios(
    inputs: torch.Tensor, outputs: torch.Tensor, pairs: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """OI ratio of each pair and neuron: ``inputs [tokens, d_in]``, ``outputs [tokens, neurons]``, ``pairs [P, 2]`` -> ``[P, neurons]``.

    Pairs whose inputs are identical (distance 0) have no defined ratio and are
    NaN; ``mapping_difficulty`` ignores them.
    """
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"inputs have {inputs.shape[0]} tokens but outputs have {outputs.shape[0]}")
    x = inputs.double()
    y = outputs.double()
    dx = (x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=1)  # [P]
    dy = (y[pairs[:, 0]] - y[pairs[:, 1]]).abs()  # [P, neurons]
    dx_norm = dx / dx.max().clamp_min(eps)
    # torch.median returns the lower middle value; quantile(0.5) averages the two, as numpy does.
    dy_norm = dy / torch.quantile(dy, 0.5, dim=0).clamp_min(eps)
    ratios = dy_norm / dx_norm[:, None]
    return torch.where(dx[:, None] > eps, ratios, torch.full_like(ratios, float("nan")))


def mapping_difficulty(
    inputs: torch.Tensor, outputs: torch.Tensor, num_pairs: int = 1000, seed: int = 0
) -> torch.Tensor:
    """MD per neuron: mean OI ratio over ``num_pairs`` random token pairs -> ``[neurons]`` float64."""
    pairs = sample_token_pairs(inputs.shape[0], num_pairs, seed)
    return torch.nanmean(oi_ratios(inputs, outputs, pairs), dim=0)
