"""Negative-computation ablation: clamp (or flip) the pre-activations of chosen FFN neurons.

The follow-up paper (``negative-computation.md``) removes the negative
pre-activation range of the top few % of neurons by Wasserstein distance and
finds perplexity rises far more than for random neurons. This module is the
library side of ``sparse-expansion ablate``:

* ``ablation_targets``: which module's outputs are the neurons (the gate
  projection of a gated MLP, else the FFN input projection);
* ``select_neurons`` / ``select_per_layer``: top / bottom / random p% by a
  per-neuron score, exact counts, seeded;
* ``ablate_neurons``: a context manager adding forward hooks that rewrite
  only the selected output columns; weights are never touched and the hooks
  are removed on exit (also on error);
* ``evaluate_ablation``: the sweep over p x selection x mode, as a table.

Why clamping the pre-activation is the paper's "ReLU after the activation":
SiLU and GELU are negative exactly where their input is negative and are 0 at
0, so ``act(max(x, 0)) == max(act(x), 0)``. On a gated MLP the gate's product
with ``up`` can still be negative; what is removed is the gate's negative range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from sparse_expansion_plugin.analysis.hooks import hooks_attached, run_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
from sparse_expansion_plugin.modeling.targets import FFNBlock, ffn_blocks, weight_as_out_in

logger = logging.getLogger(__name__)

SELECTIONS = ("top", "random", "bottom")
MODES = ("clamp", "flip")
DEFAULT_PERCENTS = (0.5, 1.0, 2.0, 5.0)


def check_percent(percent: float) -> float:
    """Return ``percent`` as a float if it lies in (0, 100]; raise a clear error otherwise."""
    value = float(percent)
    if not (0.0 < value <= 100.0) or math.isnan(value):
        raise ValueError(
            f"percent must lie in (0, 100] (a percentage of each layer's neurons), got {percent!r}"
        )
    return value


def neuron_count(num_neurons: int, percent: float) -> int:
    """How many of ``num_neurons`` neurons ``percent`` % selects: round half up, at least one.

    At least one, so that a small p on a small layer still ablates something;
    the count used is reported in the table so nobody is misled.
    """
    if num_neurons < 1:
        raise ValueError(f"a layer must have at least one neuron, got {num_neurons}")
    percent = check_percent(percent)
    return min(num_neurons, max(1, math.floor(num_neurons * percent / 100.0 + 0.5)))


def select_neurons(
    scores: torch.Tensor,
    percent: float,
    selection: str = "top",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the selected neurons of one layer: ``scores [neurons]`` -> sorted ``LongTensor [count]``.

    ``top``/``bottom`` take the highest/lowest scores (ties broken by index, so
    the choice is deterministic); ``random`` draws the same count uniformly
    without replacement from ``generator`` (seed it for reproducibility).
    NaN scores are never chosen by ``top`` or ``bottom``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be one value per neuron, [neurons], got shape {tuple(scores.shape)}")
    count = neuron_count(scores.numel(), percent)
    if selection == "random":
        chosen = torch.randperm(scores.numel(), generator=generator)[:count]
    elif selection in ("top", "bottom"):
        values = scores.detach().double().cpu()
        fill = -math.inf if selection == "top" else math.inf
        values = torch.where(torch.isnan(values), torch.full_like(values, fill), values)
        order = torch.sort(values, descending=selection == "top", stable=True).indices
        chosen = order[:count]
    else:
        raise ValueError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    return torch.sort(chosen).values


def select_per_layer(
    scores: Mapping[str, torch.Tensor],
    percent: float,
    selection: str = "top",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``select_neurons`` for every layer: ``{module name: scores [neurons]}`` -> ``{module name: indices}``.

    One generator seeded with ``seed`` draws the random selections of the
    layers in the mapping's order, so a seed fixes the whole selection.
    """
    generator = torch.Generator().manual_seed(seed)
    return {name: select_neurons(s, percent, selection, generator) for name, s in scores.items()}


def ablation_module_name(block: FFNBlock) -> str:
    """The module whose output columns are a block's neurons: the gate if gated, else the input projection."""
    if block.gate is not None:
        return block.gate
    if len(block.inputs) != 1:
        raise ValueError(
            f"FFN block {block.parent!r} has several input projections ({', '.join(block.inputs)}) and no gate; "
            "name the module to ablate explicitly"
        )
    return block.inputs[0]


def ablation_targets(model: nn.Module) -> list[str]:
    """Module names to ablate, one per decoder layer in layer order (raises if the model has no FFN)."""
    return [ablation_module_name(block) for block in ffn_blocks(model)]


def _rewrite_columns(mode: str, index: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        idx = index.to(output.device)
        selected = output.index_select(-1, idx)
        new = selected.clamp_min(0) if mode == "clamp" else -selected
        # Out of place: every other column is the very same value, bit for bit.
        return output.index_copy(-1, idx, new)

    return hook


@contextmanager
def ablate_neurons(
    model: nn.Module,
    selection: Mapping[str, torch.Tensor],
    mode: str = "clamp",
) -> Iterator[None]:
    """Within the ``with`` block, rewrite the selected output columns of the named modules.

    ``selection``: ``{module name: LongTensor [k] of output indices}``.
    ``mode="clamp"`` sets the selected pre-activations to ``max(x, 0)``;
    ``mode="flip"`` to ``-x``. Forward hooks only: the weights are untouched
    and the hooks are removed when the block exits, even on an exception.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose from {', '.join(MODES)}")
    modules = dict(model.named_modules())
    hooks = []
    for name, index in selection.items():
        if name not in modules:
            raise ValueError(
                f"no module named {name!r} in {type(model).__name__}; see ablation_targets(model)"
            )
        module = modules[name]
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        width = getattr(module, "out_features", None)
        if width is None and isinstance(getattr(module, "weight", None), torch.Tensor):
            width = weight_as_out_in(module).shape[0]
        if index.numel() and width is not None and (index.min() < 0 or index.max() >= width):
            raise ValueError(f"neuron index out of range for {name!r} with {width} outputs")
        if index.numel():
            hooks.append((module, _rewrite_columns(mode, index)))
    with hooks_attached(hooks):
        yield


@dataclass
class AblationRow:
    """One cell of the sweep: perplexity with ``mode`` applied to ``selection`` at ``percent`` % per layer."""

    mode: str
    selection: str
    percent: float
    seed: int
    neurons_per_layer: int
    neurons_total: int
    perplexity: float
    ratio_to_baseline: float


@dataclass
class AblationTable:
    """The baseline perplexity and one ``AblationRow`` per (mode, selection, percent, seed)."""

    baseline_perplexity: float
    num_windows: int
    seq_len: int
    targets: list[str]
    rows: list[AblationRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "baseline_perplexity": self.baseline_perplexity,
            "num_windows": self.num_windows,
            "seq_len": self.seq_len,
            "targets": self.targets,
            "rows": [asdict(r) for r in self.rows],
        }

    def mean_perplexity(self, mode: str, selection: str, percent: float) -> float:
        """Mean perplexity over the seeds of one cell (several only for ``random``)."""
        values = [
            r.perplexity
            for r in self.rows
            if r.mode == mode and r.selection == selection and math.isclose(r.percent, percent)
        ]
        if not values:
            raise KeyError(f"no row for mode={mode} selection={selection} percent={percent}")
        return sum(values) / len(values)

    def markdown(self) -> str:
        """A Markdown table: one line per (mode, p), columns top / random (mean of seeds) / bottom."""
        modes = [m for m in MODES if any(r.mode == m for r in self.rows)]
        percents = sorted({r.percent for r in self.rows})
        selections = [s for s in SELECTIONS if any(r.selection == s for r in self.rows)]
        lines = [
            f"baseline perplexity: {self.baseline_perplexity:.2f}",
            "",
            "| mode | p % | neurons/layer | " + " | ".join(selections) + " |",
            "|---|---|---|" + "---|" * len(selections),
        ]
        for mode in modes:
            for p in percents:
                cells = []
                count = next((r.neurons_per_layer for r in self.rows if r.percent == p), 0)
                for s in selections:
                    seeds = [r for r in self.rows if r.mode == mode and r.selection == s and r.percent == p]
                    if not seeds:
                        cells.append("-")
                        continue
                    vals = torch.tensor([r.perplexity for r in seeds], dtype=torch.float64)
                    cell = f"{vals.mean().item():.2f}"
                    if len(seeds) > 1:
                        cell += f" ± {vals.std().item():.2f} (n={len(seeds)})"
                    cells.append(cell)
                lines.append(f"| {mode} | {p:g} | {count} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_ablation(
    model: nn.Module,
    windows: torch.Tensor,
    scores: Mapping[str, torch.Tensor],
    percents: Sequence[float] = DEFAULT_PERCENTS,
    selections: Sequence[str] = SELECTIONS,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    random_repeats: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> AblationTable:
    """Perplexity on ``windows [n, L]`` for every (mode, selection, p) with neurons chosen by ``scores``.

    ``scores``: ``{module name: [neurons]}`` (e.g. WD of each gate projection,
    see ``wd_scores``); the selected columns of each named module are ablated
    at the same time. ``random`` is repeated ``random_repeats`` times with seeds
    ``seed, seed + 1, ...``; ``top`` and ``bottom`` do not depend on the seed.
    """
    percents = [check_percent(p) for p in percents]
    for s in selections:
        if s not in SELECTIONS:
            raise ValueError(f"unknown selection {s!r}; choose from {', '.join(SELECTIONS)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown ablation mode {m!r}; choose from {', '.join(MODES)}")
    if not scores:
        raise ValueError("scores is empty: give one score tensor per module to ablate")
    if random_repeats < 1:
        raise ValueError(f"random_repeats must be at least 1, got {random_repeats}")
    baseline = token_perplexity(model, windows, batch_size, progress=progress)
    logger.info("baseline perplexity %.3f on %d x %d tokens", baseline, *windows.shape)
    table = AblationTable(baseline, int(windows.shape[0]), int(windows.shape[1]), list(scores))
    sizes = {name: s.numel() for name, s in scores.items()}
    for mode in modes:
        for percent in percents:
            for selection in selections:
                seeds = [seed + i for i in range(random_repeats)] if selection == "random" else [seed]
                for run_seed in seeds:
                    chosen = select_per_layer(scores, percent, selection, run_seed)
                    with ablate_neurons(model, chosen, mode):
                        ppl = token_perplexity(model, windows, batch_size, progress=progress)
                    counts = {len(v) for v in chosen.values()}
                    per_layer = counts.pop() if len(counts) == 1 else -1
                    row = AblationRow(
                        mode,
                        selection,
                        percent,
                        run_seed,
                        per_layer,
                        sum(len(v) for v in chosen.values()),
                        ppl,
                        ppl / baseline,
                    )
                    table.rows.append(row)
                    logger.info(
                        "%s %s %g%% (%d of %s neurons per layer, seed %d): perplexity %.3f (x%.3f)",
                        mode,
                        selection,
                        percent,
                        row.neurons_total // max(1, len(chosen)),
                        sorted(set(sizes.values())),
                        run_seed,
                        ppl,
                        ppl / baseline,
                    )
    return table


def wd_scores(
    model: nn.Module,
    windows: torch.Tensor,
    targets: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """WD of every ablation target's neurons over ``windows [n, L]``: ``{module name: [neurons]}``.

    Streams the windows through the shared capture
    (``analysis.capture.collect_neuron_statistics``); default targets are
    ``ablation_targets(model)``.
    """
    from sparse_expansion_plugin.analysis.capture import collect_neuron_statistics

    names = list(targets) if targets is not None else ablation_targets(model)
    # MD comes along with the capture; keep its pair sample within what short texts hold.
    num_pairs = max(1, min(1000, windows.numel() // 2))
    stats = collect_neuron_statistics(model, windows, names, batch_size=batch_size, num_pairs=num_pairs)
    return {name: stats[name].wd.detach().double().cpu() for name in names}


ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "activation")


def activation_of(model: nn.Module, module_name: str) -> nn.Module | None:
    """The nonlinearity applied to ``module_name``'s outputs, found on its parent (``act_fn``, ``act``, ...).

    ``None`` when the parent has none of the known attributes (then only
    pre-activations can be shown).
    """
    parent_name = module_name.rsplit(".", 1)[0] if "." in module_name else ""
    parent = model.get_submodule(parent_name)
    for attr in ACTIVATION_ATTRS:
        act = getattr(parent, attr, None)
        if callable(act):
            return act
    return None


@torch.no_grad()
def pre_post_activations(
    model: nn.Module,
    windows: torch.Tensor,
    module_name: str,
    neurons: torch.Tensor,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pre-activations ``[tokens, k]`` of ``neurons`` of ``module_name`` over ``windows``, and ``act(pre)`` or None."""
    module = model.get_submodule(module_name)
    index = torch.as_tensor(neurons, dtype=torch.long).flatten()
    chunks: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        chunks.append(
            output.detach().index_select(-1, index.to(output.device)).reshape(-1, index.numel()).cpu()
        )

    with hooks_attached([(module, hook)]):
        run_windows(model, windows, batch_size, "pre-activations", progress=False)
    pre = torch.cat(chunks).float()
    act = activation_of(model, module_name)
    return pre, (act(pre) if act is not None else None)
