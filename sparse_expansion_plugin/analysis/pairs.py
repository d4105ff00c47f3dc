"""Token pairs that entangled neurons separate most, and how other layers treat them.

Follows appendix A of the negative-computation paper: sample ``P`` random
token pairs (``2P`` distinct tokens), capture every layer's FFN input
projection at those tokens, compute OI ratios (``metrics.mapping.oi_ratios``)
and each neuron's MD (mean OI ratio over the pairs). For a layer, its ``k``
most entangled neurons (highest MD) each contribute their ``m`` highest-OI
pairs: a pool of ``k * m`` "high-effort" pairs (repeats kept, as the paper).

Cross-layer z-scores: for every layer ``l`` and each of *its* ``k`` most
entangled neurons ``n``, a pool pair's OI ratio is z-scored against that
neuron's OI ratios over all ``P`` pairs; the z-scores are averaged over the
``k`` neurons, then over the pool. ``zscores[s, l]`` is that average for the
pool selected at source layer ``s``; ``normalized[s, l] = zscores[s, l] /
zscores[s, s]`` (the paper's "normalised to the source layer").
``input_distance_z[s]``: mean z-score of the pool pairs' input distances at
layer ``s`` against all pairs (the paper's figure 2b).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sparse_expansion_plugin.analysis.ablation import ablation_module_name
from sparse_expansion_plugin.analysis.hooks import hooks_attached, run_windows
from sparse_expansion_plugin.metrics.mapping import oi_ratios, sample_token_pairs
from sparse_expansion_plugin.modeling.targets import ffn_blocks

logger = logging.getLogger(__name__)


@dataclass
class LayerCapture:
    """One layer's projection at the sampled tokens: ``inputs [2P, d_in]``, ``outputs [2P, neurons]``."""

    name: str
    inputs: torch.Tensor
    outputs: torch.Tensor


def pair_modules(model: nn.Module, projection: str | None = None) -> list[str]:
    """The analysed projection of every decoder layer, in layer order.

    ``projection=None``: the gate of a gated MLP, else the FFN input projection
    (the neurons whose negative range the ablation removes). Otherwise the last
    name component to use (e.g. ``"up_proj"``); it must be one of the block's inputs.
    """
    names = []
    for block in ffn_blocks(model):
        if projection is None:
            names.append(ablation_module_name(block))
            continue
        hits = [n for n in block.inputs if n.rsplit(".", 1)[-1] == projection]
        if not hits:
            leaves = ", ".join(n.rsplit(".", 1)[-1] for n in block.inputs)
            raise ValueError(
                f"projection {projection!r} is not an FFN input of {block.parent!r}; candidates: {leaves}"
            )
        names.append(hits[0])
    return names


@torch.no_grad()
def capture_at_tokens(
    model: nn.Module,
    windows: torch.Tensor,
    module_names: Sequence[str],
    positions: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> list[LayerCapture]:
    """Inputs and outputs of each named linear at flat token ``positions [T]`` of ``windows [n, L]``.

    Flat position ``i`` is token ``i % L`` of window ``i // L``. Row ``r`` of
    each capture is position ``positions[r]``. Hooks are removed on return.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, L] token ids, got shape {tuple(windows.shape)}")
    n, length = windows.shape
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    if positions.numel() and (positions.min() < 0 or positions.max() >= n * length):
        raise ValueError(f"token positions must lie in [0, {n * length}), the flattened windows")
    modules = dict(model.named_modules())
    for name in module_names:
        if name not in modules:
            raise ValueError(f"no module named {name!r} in {type(model).__name__}")
    captures: dict[str, list[torch.Tensor | None]] = {name: [None, None] for name in module_names}

    def make_hook(name: str):
        seen = [0]  # flat positions this module has already been fed (batches arrive in order)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            y = output.detach().reshape(-1, output.shape[-1])
            lo, hi = seen[0], seen[0] + x.shape[0]
            seen[0] = hi
            rows = ((positions >= lo) & (positions < hi)).nonzero().flatten()
            slot = captures[name]
            inputs, outputs = slot
            if inputs is None or outputs is None:  # first call: both are allocated together
                inputs = slot[0] = torch.zeros(len(positions), x.shape[1], dtype=x.dtype)
                outputs = slot[1] = torch.zeros(len(positions), y.shape[1], dtype=y.dtype)
            local = (positions[rows] - lo).to(x.device)
            inputs[rows] = x[local].cpu()
            outputs[rows] = y[local].cpu()

        return hook

    with hooks_attached((modules[name], make_hook(name)) for name in module_names):
        run_windows(model, windows, batch_size, "capture", progress)
    return [LayerCapture(name, slot[0], slot[1]) for name, slot in captures.items()]  # type: ignore[arg-type]


def _nan_zscore(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over dim 0 ignoring NaN: ``[P, k]`` -> (``[k]``, ``[k]``)."""
    mean = torch.nanmean(values, dim=0)
    var = torch.nanmean((values - mean) ** 2, dim=0)
    return mean, var.sqrt()


@dataclass
class PairRecord:
    """One high-OI pair of one entangled neuron, with its tokens and where they land in the output.

    ``neuron_rank``: 0 for the layer's most entangled neuron; ``pair_rank``: 0
    for the neuron's highest-OI pair; ``positions``: flat token positions.
    """

    neuron: int
    neuron_rank: int
    pair_rank: int
    pair_index: int
    positions: tuple[int, int]
    token_ids: tuple[int, int]
    next_token_ids: tuple[int | None, int | None]
    oi_ratio: float
    outputs: tuple[float, float]
    input_distance: float
    tokens: tuple[str, str] = ("", "")
    next_tokens: tuple[str | None, str | None] = (None, None)

    @property
    def sides(self) -> tuple[str, str]:
        """``"negative"``/``"positive"`` side of the neuron's pre-activation for each token."""
        return tuple("negative" if v < 0 else "positive" for v in self.outputs)  # type: ignore[return-value]


@dataclass
class PairAnalysis:
    """Everything ``sparse-expansion pairs`` reports about one model.

    ``pairs [P, 2]`` flat token positions; per layer (index ``l`` in
    ``layer_names``): ``top_neurons[l] [k]`` by MD, ``md[l] [neurons]``,
    ``top_oi[l] [P, k]`` the OI ratios of those neurons, ``input_distances[l] [P]``;
    ``pools[l] [k*m, 2]`` (neuron rank, pair index) of the high-effort pool;
    ``zscores [layers, layers]``, ``normalized [layers, layers]``,
    ``input_distance_z [layers]`` (see module docstring); ``pair_zscores[s]
    [layers, k*m]`` each pool pair's z-score at each layer; ``top_outputs[l]
    [2P, k]`` the top neurons' outputs at the sampled tokens (row ``2i + j``
    is token ``j`` of pair ``i``).
    """

    layer_names: list[str]
    pairs: torch.Tensor
    md: list[torch.Tensor]
    top_neurons: list[torch.Tensor]
    top_oi: list[torch.Tensor]
    input_distances: list[torch.Tensor]
    pools: list[torch.Tensor]
    zscores: torch.Tensor
    normalized: torch.Tensor
    input_distance_z: torch.Tensor
    pair_zscores: list[torch.Tensor] = field(default_factory=list)
    top_outputs: list[torch.Tensor] = field(default_factory=list)
    pairs_per_neuron: int = 1


def top_neurons_by_md(oi: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MD per neuron (NaN-ignoring mean of ``oi [P, neurons]``) and the ``k`` highest, ties by index."""
    md = torch.nanmean(oi, dim=0)
    order = torch.sort(torch.nan_to_num(md, nan=-torch.inf), descending=True, stable=True).indices
    return md, order[:k]


def high_effort_pool(top_oi: torch.Tensor, pairs_per_neuron: int) -> torch.Tensor:
    """``[k * m, 2]`` rows of (neuron rank, pair index): each neuron's ``m`` highest-OI pairs (NaN never)."""
    filled = torch.nan_to_num(top_oi, nan=-torch.inf)
    rows: list[tuple[int, int]] = []
    for rank in range(top_oi.shape[1]):
        order = torch.sort(filled[:, rank], descending=True, stable=True).indices[:pairs_per_neuron]
        rows.extend((rank, int(p)) for p in order)
    return torch.tensor(rows, dtype=torch.long).view(-1, 2)


def cross_layer_zscores(
    top_oi: Sequence[torch.Tensor],
    input_distances: Sequence[torch.Tensor],
    pools: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Z-score matrix of each source layer's pool at every layer (see module docstring).

    ``top_oi[l] [P, k]``, ``input_distances[l] [P]``, ``pools[s] [k*m, 2]``.
    Returns ``zscores [S, S]``, ``normalized [S, S]``, ``input_distance_z [S]``
    and, per source layer, ``pair_zscores[s] [S, k*m]`` (each pool pair at each layer).
    """
    num_layers = len(top_oi)
    z_per_layer = []
    for oi in top_oi:
        mean, std = _nan_zscore(oi)
        z_per_layer.append((oi - mean) / std.clamp_min(1e-12))  # [P, k]
    z_pair_layer = torch.stack([torch.nanmean(z, dim=1) for z in z_per_layer])  # [layers, P]
    zscores = torch.empty(num_layers, num_layers, dtype=torch.float64)
    input_z = torch.empty(num_layers, dtype=torch.float64)
    pair_z = []
    for s, pool in enumerate(pools):
        pair_index = pool[:, 1]
        per_pair = z_pair_layer[:, pair_index]  # [layers, k*m]
        pair_z.append(per_pair)
        zscores[s] = torch.nanmean(per_pair, dim=1)
        d = input_distances[s].double()
        mean, std = _nan_zscore(d[:, None])
        input_z[s] = ((d[pair_index] - mean) / std.clamp_min(1e-12)).mean()
    normalized = zscores / zscores.diagonal()[:, None]
    return zscores, normalized, input_z, pair_z


def analyze_pairs(
    model: nn.Module,
    windows: torch.Tensor,
    num_pairs: int = 1000,
    top_neurons: int = 10,
    pairs_per_neuron: int = 10,
    seed: int = 0,
    projection: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PairAnalysis:
    """Run the appendix-A procedure on ``windows [n, L]`` for every FFN layer (see module docstring)."""
    if top_neurons < 1 or pairs_per_neuron < 1:
        raise ValueError("top_neurons and pairs_per_neuron must be at least 1")
    if pairs_per_neuron > num_pairs:
        raise ValueError(f"pairs_per_neuron ({pairs_per_neuron}) cannot exceed num_pairs ({num_pairs})")
    names = pair_modules(model, projection)
    pairs = sample_token_pairs(windows.numel(), num_pairs, seed)
    captures = capture_at_tokens(model, windows, names, pairs.reshape(-1), batch_size, progress)
    local = torch.arange(2 * num_pairs).view(num_pairs, 2)
    md, tops, top_oi, dists, pools, top_out = [], [], [], [], [], []
    for cap in captures:
        if top_neurons > cap.outputs.shape[1]:
            raise ValueError(
                f"top_neurons={top_neurons} exceeds the {cap.outputs.shape[1]} neurons of {cap.name}"
            )
        oi = oi_ratios(cap.inputs, cap.outputs, local)  # [P, neurons]
        layer_md, top = top_neurons_by_md(oi, top_neurons)
        md.append(layer_md)
        tops.append(top)
        top_oi.append(oi[:, top])
        x = cap.inputs.double()
        dists.append((x[local[:, 0]] - x[local[:, 1]]).norm(dim=1))
        pools.append(high_effort_pool(oi[:, top], pairs_per_neuron))
        top_out.append(cap.outputs[:, top].clone())
        cap.inputs = cap.outputs = torch.empty(0)  # free as we go: all layers together can be GBs
        logger.info(
            "%s: top-%d MD %s", cap.name, top_neurons, [round(v, 2) for v in layer_md[top][:5].tolist()]
        )
    zscores, normalized, input_z, pair_z = cross_layer_zscores(top_oi, dists, pools)
    return PairAnalysis(
        names,
        pairs,
        md,
        tops,
        top_oi,
        dists,
        pools,
        zscores,
        normalized,
        input_z,
        pair_z,
        top_out,
        pairs_per_neuron,
    )


def check_layer(analysis: PairAnalysis, layer: int) -> int:
    """Validate a layer index (negative counts from the end) against the analysed layers."""
    count = len(analysis.layer_names)
    if not -count <= layer < count:
        raise ValueError(
            f"layer index {layer} is out of range: the model has {count} FFN layers (0..{count - 1})"
        )
    return layer % count


def pair_records(
    analysis: PairAnalysis, layer: int, windows: torch.Tensor, tokenizer=None
) -> list[PairRecord]:
    """The ``k * m`` pool of ``layer`` as readable records (tokens decoded when ``tokenizer`` is given)."""
    layer = check_layer(analysis, layer)
    outputs = analysis.top_outputs[layer]
    flat = windows.reshape(-1)
    length = windows.shape[1]
    records = []
    for row, (rank, pair_index) in enumerate(analysis.pools[layer].tolist()):
        neuron = int(analysis.top_neurons[layer][rank])
        pos = [int(p) for p in analysis.pairs[pair_index]]
        nxt = [int(flat[p + 1]) if (p + 1) % length else None for p in pos]
        ids = [int(flat[p]) for p in pos]
        y = outputs[[2 * pair_index, 2 * pair_index + 1], rank]
        rec = PairRecord(
            neuron=neuron,
            neuron_rank=rank,
            pair_rank=row % analysis.pairs_per_neuron,
            pair_index=pair_index,
            positions=(pos[0], pos[1]),
            token_ids=(ids[0], ids[1]),
            next_token_ids=(nxt[0], nxt[1]),
            oi_ratio=float(analysis.top_oi[layer][pair_index, rank]),
            outputs=(float(y[0]), float(y[1])),
            input_distance=float(analysis.input_distances[layer][pair_index]),
        )
        if tokenizer is not None:
            rec.tokens = tuple(tokenizer.convert_ids_to_tokens(ids))  # type: ignore[assignment]
            rec.next_tokens = tuple(  # type: ignore[assignment]
                None if t is None else tokenizer.convert_ids_to_tokens(t) for t in nxt
            )
        records.append(rec)
    return records
