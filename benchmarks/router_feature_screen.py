"""Layer-local screen of router feature spaces for Sparse Expansion (a fast proxy, not a perplexity).

Why: a full-model perplexity run costs 5-10 minutes per variant on 2 cores, so
candidate routers are screened first on what they act on, one MLP block at a
time. For each chosen decoder layer of the dense model, the MLP's inputs are
captured on calibration windows (a seeded draw) and on held-out evaluation
windows. Each variant clusters the calibration tokens (l2-normalised, then a
*linear feature map*, then PCA + k-means, as the package's router), prunes 16
experts of gate, up and down with SparseGPT on per-cluster Hessians (the
package's solver and count prior, down routed by the block's routing), and
scores the block's output on the held-out tokens:
``relative error = sum ||y - y_hat||^2 / sum ||y||^2``. SparseGPT (one
expert, the layer's Hessian) is the reference; "error closed" is
``1 - err_variant / err_sparsegpt``.

Every feature map here is linear in the unit-normalised token, so a router that
uses it folds into the package's existing ``[K, d]`` router: no format change.

    flock /tmp/heavy.lock python benchmarks/router_feature_screen.py --layers 2 8 14 20 26 29 \
        --seed 0 --output bench-se/router_screen.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
from sparse_expansion_plugin.sparse_expansion.clustering import top_components
from sparse_expansion_plugin.sparse_expansion.hessians import StreamingClusterHessians, regularized_hessians


def capture_mlp_inputs(model: Any, windows: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """MLP inputs ``[N, d]`` (float32, CPU) of the dense model at each of ``layers``."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:
        mlp = model.model.layers[i].mlp

        def grab(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        handles.append(mlp.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for row in windows:
                model(row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in captured.items()}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def feature_maps(gate: torch.Tensor, up: torch.Tensor, calib_unit: torch.Tensor) -> dict[str, Callable]:
    """Variant name -> function of unit tokens ``[N, d]`` giving router features (linear, except 'abs')."""
    col = torch.sqrt((gate**2).sum(0) + (up**2).sum(0))  # [d] column norms of gate and up
    std = calib_unit.std(dim=0).clamp_min(1e-6)
    both = torch.cat([gate, up])  # [2 * inter, d]
    return {
        "unit (default)": lambda u: u,
        "unit * column norm": lambda u: u * col,
        "standardised unit": lambda u: u / std,
        "gate pre-activation": lambda u: u @ gate.t(),
        "gate+up pre-activation": lambda u: u @ both.t(),
        "abs(unit) (not foldable)": lambda u: u.abs(),
    }


def assign(
    features: Callable, calib_unit: torch.Tensor, eval_unit: torch.Tensor, k: int, pca: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the PCA of the features; the nearest centroid of every calibration and eval token."""
    fit = features(calib_unit).double()
    mean, comps = top_components(fit, pca, seed)
    km = KMeans(n_clusters=k, n_init=1, max_iter=300, random_state=seed).fit(
        ((fit - mean) @ comps.t()).numpy()
    )
    centres = torch.from_numpy(km.cluster_centers_)

    def nearest(u: torch.Tensor) -> torch.Tensor:
        return torch.cdist((features(u).double() - mean) @ comps.t(), centres).argmin(dim=1)

    return nearest(calib_unit), nearest(eval_unit)


def second_choice(
    calib_unit: torch.Tensor, k: int, pca: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`assign` on unit tokens: each calibration token's nearest and second-nearest centroid,
    and the gap ``d_2^2 - d_1^2`` between their squared distances (same PCA and k-means, same seed)."""
    fit = calib_unit.double()
    mean, comps = top_components(fit, pca, seed)
    projected = (fit - mean) @ comps.t()
    km = KMeans(n_clusters=k, n_init=1, max_iter=300, random_state=seed).fit(projected.numpy())
    dist = torch.cdist(projected, torch.from_numpy(km.cluster_centers_)) ** 2
    two = dist.topk(2, dim=1, largest=False)
    return two.indices[:, 0], two.indices[:, 1], two.values[:, 1] - two.values[:, 0]


def soft_experts(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    share: torch.Tensor,
    k: int,
    tau: float,
) -> torch.Tensor:
    """As :func:`experts`, each token counted in two clusters' Hessians: ``1 - share`` in its own,
    ``share`` in its second-nearest (the count prior uses the weighted counts)."""
    x = inputs.float()
    hessians = torch.zeros(k, x.shape[1], x.shape[1])
    counts = torch.zeros(k, dtype=torch.float64)
    for e in range(k):
        own, near = first == e, second == e
        rows = torch.cat([x[own] * (1 - share[own]).sqrt()[:, None], x[near] * share[near].sqrt()[:, None]])
        hessians[e] = rows.t() @ rows
        counts[e] = float((1 - share[own]).sum() + share[near].sum())
    layer = x.t() @ x / len(x)
    for e in range(k):
        own_mean = hessians[e] / max(float(counts[e]), 1e-9)
        hessians[e] = (counts[e] * own_mean + tau * layer) / (counts[e] + tau)
    pruned, _ = sparsegpt_prune(weight, hessians, sparsity=0.5)
    return pruned


def soft_block_experts(
    weights: tuple[torch.Tensor, ...],
    inputs: tuple[torch.Tensor, ...],
    first: torch.Tensor,
    second: torch.Tensor,
    share: torch.Tensor,
    k: int,
    tau: float,
) -> tuple[torch.Tensor, ...]:
    """:func:`soft_experts` of gate, up and down (each with its own calibration inputs)."""
    return tuple(
        soft_experts(w, x, first, second, share, k, tau) for w, x in zip(weights, inputs, strict=True)
    )


def experts(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    tau: float,
    fixed_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT 50% experts ``[k, out, in]`` of ``weight`` on per-cluster Hessians (count prior ``tau``).

    ``fixed_pruned``: one mask for every expert (True = pruned); only the values are solved per cluster."""
    acc = StreamingClusterHessians(k, inputs.shape[1])
    for start in range(0, inputs.shape[0], 4096):
        acc.add(inputs[start : start + 4096], labels[start : start + 4096])
    hessians, _ = regularized_hessians(acc.result(), prior_tokens=tau if k > 1 else 0.0)
    pruned, _ = sparsegpt_prune(weight, hessians, sparsity=0.5, fixed_pruned=fixed_pruned)
    return pruned if pruned.dim() == 3 else pruned.unsqueeze(0)


def block_experts(
    mlp: Any,
    x_cal: torch.Tensor,
    lab_cal: torch.Tensor,
    k: int,
    tau: float,
    shared_masks: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up and down experts of one MLP block, down calibrated on the dense hidden state.

    ``shared_masks``: gate, up and down pruned masks every expert keeps (else each expert chooses its own)."""
    gate, up, down = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    hidden_cal = F.silu(x_cal @ gate.t()) * (x_cal @ up.t())  # down's dense calibration inputs
    masks = shared_masks or (None, None, None)
    g_k = experts(gate, x_cal, lab_cal, k, tau, masks[0])
    u_k = experts(up, x_cal, lab_cal, k, tau, masks[1])
    return g_k, u_k, experts(down, hidden_cal, lab_cal, k, tau, masks[2])


def dense_block(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def routed_error(mlp: Any, weights: tuple[torch.Tensor, ...], x: torch.Tensor, labels: torch.Tensor) -> float:
    """Relative output error of the routed, pruned block on tokens ``x`` routed by ``labels``."""
    g_k, u_k, d_k = weights
    y = dense_block(mlp, x)
    y_hat = torch.empty_like(y)
    for e in range(g_k.shape[0]):
        rows = labels == e
        xe = x[rows]
        y_hat[rows] = (F.silu(xe @ g_k[e].t()) * (xe @ u_k[e].t())) @ d_k[e].t()
    return float(((y - y_hat) ** 2).sum() / (y**2).sum())


def oracle_error(mlp: Any, weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> float:
    """Relative error when every token takes the expert that reconstructs it best (a bound on any router)."""
    g_k, u_k, d_k = weights
    y = dense_block(mlp, x)
    best = torch.full((x.shape[0],), float("inf"))
    for e in range(g_k.shape[0]):
        y_e = (F.silu(x @ g_k[e].t()) * (x @ u_k[e].t())) @ d_k[e].t()
        best = torch.minimum(best, ((y - y_e) ** 2).sum(dim=1))
    return float(best.sum() / (y**2).sum())


def block_error(
    mlp: Any,
    x_cal: torch.Tensor,
    x_eval: torch.Tensor,
    lab_cal: torch.Tensor,
    lab_eval: torch.Tensor,
    k: int,
    tau: float,
) -> float:
    """Relative output error of the routed, pruned MLP block on the held-out tokens."""
    return routed_error(mlp, block_experts(mlp, x_cal, lab_cal, k, tau), x_eval, lab_eval)


@dataclass(frozen=True)
class Block:
    """One decoder layer's MLP with its captured inputs, raw and unit-normalised, the PCA size and
    SparseGPT's experts of the block (the K = 1 reference)."""

    layer: int
    mlp: Any
    xc: torch.Tensor
    xe: torch.Tensor
    uc: torch.Tensor
    ue: torch.Tensor
    pca: int
    stock: tuple[torch.Tensor, ...]


def astuple_shallow(block: Block) -> tuple[Any, ...]:
    """The block's fields in order, not copied (``dataclasses.astuple`` deep-copies tensors)."""
    return tuple(getattr(block, f.name) for f in fields(block))


class ClosedScore:
    """Error closed against SparseGPT (``stock``, K = 1) on the held-out tokens and on as many
    calibration tokens (a seeded draw): the gap between the two is overfitting."""

    def __init__(
        self, mlp: Any, xc: torch.Tensor, xe: torch.Tensor, stock: tuple[torch.Tensor, ...], seed: int
    ) -> None:
        self.mlp, self.xc, self.xe = mlp, xc, xe
        self.seen = torch.randperm(len(xc), generator=torch.Generator().manual_seed(seed))[: len(xe)]
        self.base_eval = routed_error(mlp, stock, xe, torch.zeros(len(xe), dtype=torch.long))
        self.base_seen = routed_error(
            mlp, stock, xc[self.seen], torch.zeros(len(self.seen), dtype=torch.long)
        )

    def __call__(
        self, weights: tuple[torch.Tensor, ...], lab_c: torch.Tensor, lab_e: torch.Tensor
    ) -> dict[str, float]:
        seen = self.seen
        return {
            "closed": 1 - routed_error(self.mlp, weights, self.xe, lab_e) / self.base_eval,
            "closed_on_calibration": 1
            - routed_error(self.mlp, weights, self.xc[seen], lab_c[seen]) / self.base_seen,
        }


def diagnose(block: Block, args: Any, rows: list[dict[str, Any]]) -> None:
    """Default router only: error closed on held-out tokens, on the calibration tokens themselves
    (the gap between them is overfitting), and with per-token oracle routing (router headroom).
    ``stock``: SparseGPT's experts of this block (K = 1), the reference."""
    layer, mlp, xc, xe, uc, ue, pca, stock = astuple_shallow(block)
    score = ClosedScore(mlp, xc, xe, stock, args.seed)
    for k in args.diagnose_experts:
        lab_c, lab_e = assign(lambda u: u, uc, ue, k, pca, args.seed)
        weights = block_experts(mlp, xc, lab_c, k, args.prior_tokens)
        row = {
            "layer": layer,
            "variant": f"K={k}",
            **score(weights, lab_c, lab_e),
            "closed_oracle": 1 - oracle_error(mlp, weights, xe) / score.base_eval,
        }
        rows.append(row)
        print(
            f"layer {layer}: K={k:<3d} held-out {row['closed']:+.1%}  calibration tokens "
            f"{row['closed_on_calibration']:+.1%}  oracle routing {row['closed_oracle']:+.1%}",
            flush=True,
        )


def record_lever(
    rows: list[dict[str, Any]], layer: int, name: str, closed: dict[str, float], t0: float
) -> None:
    """Append one lever's row (error closed held-out and on calibration tokens, seconds since ``t0``) and print it."""
    row = {"layer": layer, "variant": name, **closed, "seconds": time.perf_counter() - t0}
    rows.append(row)
    print(
        f"layer {layer}: {name:34s} held-out {row['closed']:+.1%}  calibration tokens "
        f"{row['closed_on_calibration']:+.1%} ({row['seconds']:.0f} s)",
        flush=True,
    )


def neuron_groups(
    gate: torch.Tensor, up: torch.Tensor, groups: int, how: str, seed: int
) -> list[torch.Tensor]:
    """Indices of the intermediate neurons in each of ``groups`` groups: ``contiguous`` slices, or
    ``kmeans`` of the neurons' unit [gate row, up row] (neurons that read the same input directions)."""
    n = gate.shape[0]
    if how == "contiguous":
        return list(torch.arange(n).chunk(groups))
    rows = unit(torch.cat([gate, up], dim=1)).double().numpy()
    labels = torch.from_numpy(KMeans(n_clusters=groups, n_init=1, random_state=seed).fit(rows).labels_)
    return [torch.nonzero(labels == g).flatten() for g in range(groups) if bool((labels == g).any())]


def row_group_error(
    mlp: Any,
    gate_up: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    down_k: torch.Tensor,
    x: torch.Tensor,
    group_labels: list[torch.Tensor],
    labels: torch.Tensor,
) -> float:
    """Relative output error of a block whose gate/up neurons are split into groups, each group with its
    own routing (``group_labels[g]``) over its own experts ``(idx, gate_k, up_k)``; down routed by ``labels``."""
    y = dense_block(mlp, x)
    hidden = torch.empty(x.shape[0], mlp.gate_proj.weight.shape[0])
    for (idx, g_k, u_k), lab in zip(gate_up, group_labels, strict=True):
        for e in range(g_k.shape[0]):
            rows = torch.nonzero(lab == e).flatten()
            xe = x[rows]
            hidden[rows[:, None], idx[None, :]] = F.silu(xe @ g_k[e].t()) * (xe @ u_k[e].t())
    y_hat = torch.empty_like(y)
    for e in range(down_k.shape[0]):
        rows = labels == e
        y_hat[rows] = hidden[rows] @ down_k[e].t()
    return float(((y - y_hat) ** 2).sum() / (y**2).sum())


def row_group_lever(
    block: Block,
    args: Any,
    score: ClosedScore,
    lab_c: torch.Tensor,
    lab_e: torch.Tensor,
    rows: list[dict[str, Any]],
) -> None:
    """Gate/up neurons split into G groups, each group routed by its own k-means over its own neurons'
    pre-activations (PCA of ``unit token @ [gate_g; up_g]^T``), K experts per group: the same bytes and
    FLOPs per token as K experts, but every group chooses its expert on what its neurons read.
    Down keeps the block's default routing and experts (calibrated on the dense hidden state).
    Unlike the feature maps above this is not foldable into one ``[K, d]`` router: it would need G
    routers per block in the saved format. Control: every group given the block's default routing
    (differs from the default row only by SparseGPT's block-wide threshold, now taken per group)."""
    layer, mlp, xc, xe, uc, ue, pca, _ = astuple_shallow(block)
    k, tau = args.experts, args.prior_tokens
    gate, up, down = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    hidden_cal = F.silu(xc @ gate.t()) * (xc @ up.t())
    down_k = experts(down, hidden_cal, lab_c, k, tau)
    seen = score.seen

    def scored(
        name: str, groups: list[torch.Tensor], labels: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        t0 = time.perf_counter()
        gate_up = [
            (idx, experts(gate[idx], xc, lc, k, tau), experts(up[idx], xc, lc, k, tau))
            for idx, (lc, _) in zip(groups, labels, strict=True)
        ]
        held = row_group_error(mlp, gate_up, down_k, xe, [le for _, le in labels], lab_e)
        cal = row_group_error(mlp, gate_up, down_k, xc[seen], [lc[seen] for lc, _ in labels], lab_c[seen])
        closed = {"closed": 1 - held / score.base_eval, "closed_on_calibration": 1 - cal / score.base_seen}
        record_lever(rows, layer, name, closed, t0)

    for how in args.group_by:
        for g in args.row_groups:
            groups = neuron_groups(gate, up, g, how, args.seed)
            if g == args.row_groups[0] and how == args.group_by[0]:
                scored(f"control: {g} {how} groups, block routing", groups, [(lab_c, lab_e)] * len(groups))
            labels = []
            for idx in groups:
                both = torch.cat([gate[idx], up[idx]])
                labels.append(assign(lambda u, both=both: u @ both.t(), uc, ue, k, pca, args.seed))
            scored(f"{g} {how} groups, own routing", groups, labels)


def levers(block: Block, args: Any, rows: list[dict[str, Any]]) -> None:
    """Default router, K = ``--experts``: levers against experts that overfit their cluster's tokens.

    - own masks: the package's default (each expert chooses its mask on its cluster's Hessian);
    - SparseGPT's mask shared: every expert keeps stock SparseGPT's mask and re-solves only the values
      on its cluster's Hessian (a discrete choice made on all tokens, fewer degrees of freedom);
    - a stronger count prior (``--lever-prior-tokens``): each cluster Hessian shrunk harder to the layer's;
    - soft Hessians (``--soft-scales``): each token also counted in its second-nearest cluster's Hessian,
      with a share that falls with the gap between the two squared distances (routing stays hard).
    - row groups (``--row-groups``, ``--group-by``): gate/up neurons in groups, each routed on its own
      neurons' pre-activations (:func:`row_group_lever`).
    Each scored on held-out tokens and on calibration tokens (the gap is overfitting)."""
    layer, mlp, xc, xe, uc, ue, pca, stock = astuple_shallow(block)
    score = ClosedScore(mlp, xc, xe, stock, args.seed)
    lab_c, lab_e = assign(lambda u: u, uc, ue, args.experts, pca, args.seed)
    stock_masks = tuple(w[0] == 0 for w in stock)
    k, tau = args.experts, args.prior_tokens
    variants: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {
        "own masks (default)": lambda: block_experts(mlp, xc, lab_c, k, tau)
    }
    if "shared-mask" in args.lever_names:
        variants["SparseGPT's mask shared"] = lambda: block_experts(
            mlp, xc, lab_c, k, tau, shared_masks=stock_masks
        )
    if "prior" in args.lever_names:
        variants[f"prior tokens {args.lever_prior_tokens:g}"] = lambda: block_experts(
            mlp, xc, lab_c, k, args.lever_prior_tokens
        )
    if "soft" in args.lever_names:
        first, second, gap = second_choice(uc, k, pca, args.seed)
        assert torch.equal(first, lab_c), "second_choice must repeat assign's clustering"
        gate, up, down = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        hidden = F.silu(xc @ gate.t()) * (xc @ up.t())
        for scale in args.soft_scales:
            # share of the second-nearest cluster: logistic in the distance gap, 27% at the median gap x scale
            share = torch.sigmoid(-gap / (gap.median() * scale)).float()
            variants[f"soft Hessians, scale {scale:g}"] = partial(
                soft_block_experts, (gate, up, down), (xc, xc, hidden), first, second, share, k, tau
            )
    if "row-groups" in args.lever_names:
        row_group_lever(block, args, score, lab_c, lab_e, rows)
    for name, build in variants.items():
        t0 = time.perf_counter()
        weights = build()
        record_lever(rows, layer, name, score(weights, lab_c, lab_e), t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 14, 20, 26, 29])
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--prior-tokens", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnose", action="store_true", help="default router only: overfitting and oracle")
    parser.add_argument("--diagnose-experts", type=int, nargs="+", default=[16])
    parser.add_argument("--levers", action="store_true", help="default router: levers against overfitting")
    parser.add_argument("--lever-prior-tokens", type=float, default=512.0)
    parser.add_argument(
        "--lever-names",
        nargs="+",
        default=["shared-mask", "prior", "soft"],
        help="levers to run with --levers",
    )
    parser.add_argument(
        "--soft-scales", type=float, nargs="+", default=[1.0], help="soft Hessians' gap scales"
    )
    parser.add_argument(
        "--row-groups", type=int, nargs="+", default=[4, 16], help="lever row-groups: gate/up neuron groups"
    )
    parser.add_argument(
        "--group-by",
        nargs="+",
        choices=["contiguous", "kmeans"],
        default=["contiguous"],
        help="lever row-groups: how neurons are grouped",
    )
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer()
    model.eval()
    cal_all = token_windows(tokenizer, "calibration", args.seq_len, None)
    pick = torch.randperm(len(cal_all), generator=torch.Generator().manual_seed(args.seed))
    cal = cal_all[pick[: args.calibration_samples].sort().values]
    ev = token_windows(tokenizer, "evaluation", args.seq_len, args.eval_windows)
    start = time.perf_counter()
    x_cal = capture_mlp_inputs(model, cal, args.layers)
    x_ev = capture_mlp_inputs(model, ev, args.layers)
    print(
        f"captured {cal.numel()} calibration and {ev.numel()} held-out tokens in {time.perf_counter() - start:.0f} s"
    )
    rows: list[dict[str, Any]] = []
    for layer in args.layers:
        mlp = model.model.layers[layer].mlp
        gate, up = mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()
        xc, xe = x_cal[layer], x_ev[layer]
        uc, ue = unit(xc), unit(xe)
        pca = max(1, xc.shape[1] // 32)
        zeros_c, zeros_e = torch.zeros(len(xc), dtype=torch.long), torch.zeros(len(xe), dtype=torch.long)
        stock = block_experts(mlp, xc, zeros_c, 1, 0.0)
        base = routed_error(mlp, stock, xe, zeros_e)
        print(f"layer {layer}: SparseGPT relative error {base:.4f}", flush=True)
        rows.append({"layer": layer, "variant": "SparseGPT (K=1)", "error": base, "closed": 0.0})
        block = Block(layer, mlp, xc, xe, uc, ue, pca, stock)
        if args.diagnose:
            diagnose(block, args, rows)
            continue
        if args.levers:
            levers(block, args, rows)
            continue
        for name, features in feature_maps(gate, up, uc).items():
            t0 = time.perf_counter()
            lab_c, lab_e = assign(features, uc, ue, args.experts, pca, args.seed)
            err = block_error(mlp, xc, xe, lab_c, lab_e, args.experts, args.prior_tokens)
            sizes = torch.bincount(lab_c, minlength=args.experts)
            row = {
                "layer": layer,
                "variant": name,
                "error": err,
                "closed": 1 - err / base,
                "min_cluster": int(sizes.min()),
                "max_cluster": int(sizes.max()),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"layer {layer}: {name:28s} error {err:.4f} closed {row['closed']:+.1%} "
                f"(clusters {row['min_cluster']}..{row['max_cluster']}, {row['seconds']:.0f} s)",
                flush=True,
            )
    print("\n=== mean error closed over layers ===")
    for name in dict.fromkeys(r["variant"] for r in rows):
        for key in ("closed", "closed_on_calibration", "closed_oracle"):
            vals = [r[key] for r in rows if r["variant"] == name and key in r]
            if vals:
                print(
                    f"=== {name:28s} {key:22s} {sum(vals) / len(vals):+.1%}  per layer "
                    + " ".join(f"{v:+.0%}" for v in vals)
                )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
