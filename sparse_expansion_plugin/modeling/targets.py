"""Find the feed-forward linears of a decoder-only model, by architecture.

Shared by analysis (hooks on FFN input projections), ablation and Sparse
Expansion (modules to replace). Each known family names its MLP input
projections (the ones whose outputs are the "neurons" of the papers) and its
output projection.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

# (mlp input projections, mlp output projection); names are the last path component
# and must sit under an MLP-like parent so attention's c_proj/dense are not matched.
FFN_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "llama": (("gate_proj", "up_proj"), "down_proj"),  # Llama, Mistral, Qwen, SmolLM
    "gpt_neox": (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX, Pythia
    "opt": (("fc1",), "fc2"),  # OPT
    "gpt2": (("c_fc",), "c_proj"),  # GPT-2 (Conv1D: weights stored transposed)
    "phi": (("fc1",), "fc2"),
}
MLP_PARENT = re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)|(^|\.)layers?\.\d+$|(^|\.)h\.\d+$")
GATE_NAMES = ("gate_proj",)


@dataclass(frozen=True)
class FFNBlock:
    """The FFN linears of one decoder layer: ``inputs`` (e.g. gate, up) feed ``output`` (down)."""

    layer_index: int
    parent: str
    inputs: tuple[str, ...]
    output: str | None

    @property
    def gate(self) -> str | None:
        """The gate projection of a gated MLP (whose pre-activation goes through the nonlinearity)."""
        for name in self.inputs:
            if name.rsplit(".", 1)[-1] in GATE_NAMES:
                return name
        return None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 style ``Conv1D`` (a linear whose weight is ``[in, out]``).

    Looked up in ``sys.modules`` rather than imported: a ``Conv1D`` instance can
    only exist once ``transformers.pytorch_utils`` is imported, and importing it
    here would cost seconds for models that have none.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def module_weight(module: nn.Module) -> Tensor:
    """``module.weight`` (a Linear's or Conv1D's parameter), typed; raises if it is not a tensor."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{type(module).__name__} has no weight tensor (its weight is {type(weight).__name__})"
        )
    return weight


def weight_as_out_in(module: nn.Module) -> Tensor:
    """The weight of a Linear or Conv1D as ``[out, in]`` (a transposed view for Conv1D, which stores ``[in, out]``)."""
    weight = module_weight(module)
    return weight.t() if is_conv1d(module) else weight


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear (or GPT-2 Conv1D) module of the model."""
    return [name for name, module in model.named_modules() if _is_linear(module)]


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """One ``FFNBlock`` per decoder layer, in layer order; raises if the model has none."""
    inputs_all = {n for family in FFN_FAMILIES.values() for n in family[0]}
    outputs_all = {family[1] for family in FFN_FAMILIES.values()}
    by_parent: dict[str, dict[str, list[str]]] = {}
    for name in linear_names(model):
        if "." not in name:
            continue
        parent, leaf = name.rsplit(".", 1)
        if not MLP_PARENT.search(parent):
            continue
        slot = by_parent.setdefault(parent, {"in": [], "out": []})
        if leaf in inputs_all:
            slot["in"].append(name)
        elif leaf in outputs_all:
            slot["out"].append(name)
    blocks: list[FFNBlock] = []
    for parent, slot in by_parent.items():
        if not slot["in"]:
            continue
        match = re.search(r"\.(\d+)(\.|$)", parent)
        index = int(match.group(1)) if match else len(blocks)
        blocks.append(FFNBlock(index, parent, tuple(slot["in"]), slot["out"][0] if slot["out"] else None))
    blocks.sort(key=lambda b: b.layer_index)
    if not blocks:
        raise ValueError(
            f"found no feed-forward projections in {type(model).__name__}; known names: "
            f"{', '.join(sorted(inputs_all | outputs_all))}. Pass layer names or regexes explicitly."
        )
    return blocks


def name_matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches ``pattern``: the exact name, a dotted suffix, or a ``re:`` regex.

    ``"mlp.up_proj"`` matches ``model.layers.0.mlp.up_proj`` but ``"p_proj"``
    does not (suffixes end at a dot); ``"re:..."`` is searched anywhere in the
    name (anchor it with ``^``/``$``). The one matcher of the package's own
    layer options (``--layers``, ``--plot-layer``), so they agree.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matching_names(names: list[str], pattern: str, what: str = "layer pattern") -> list[str]:
    """The ``names`` that ``pattern`` matches (``name_matches``), in order; raises with candidates if none.

    A bad regex and a pattern matching nothing both raise ``ValueError``
    naming ``what`` (the option it came from) and the last name components on offer.
    """
    try:
        hits = [n for n in names if name_matches(n, pattern)]
    except re.error as error:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {error}") from None
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"{what} {pattern!r} matched no module; candidates: {', '.join(leaves)} "
            "(or a regex prefixed with 're:')"
        )
    return hits


def select_linears(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Linear names matching ``patterns`` (``name_matches``); default: every FFN input projection.

    Raises with the candidate names when a pattern matches nothing.
    """
    if not patterns:
        return [name for block in ffn_blocks(model) for name in block.inputs]
    names = linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers to match {patterns}")
    chosen: list[str] = []
    for pattern in patterns:
        chosen.extend(h for h in matching_names(names, pattern) if h not in chosen)
    return chosen


def ffn_target_regex(model: nn.Module) -> str:
    """An llm-compressor ``targets`` entry matching exactly the model's FFN linears (inputs and output)."""
    leaves: list[str] = []
    for block in ffn_blocks(model):
        for name in (*block.inputs, *([block.output] if block.output else [])):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in leaves:
                leaves.append(leaf)
    parents = sorted({block.parent.rsplit(".", 1)[-1] for block in ffn_blocks(model)})
    return rf"re:.*\.({'|'.join(parents)})\.({'|'.join(leaves)})$"
