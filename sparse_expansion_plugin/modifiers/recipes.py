"""Load and validate llm-compressor recipes, failing loudly where llm-compressor is silent.

Why: llm-compressor 0.14 turns a flat recipe (``SparseGPTModifier: {...}`` at
the top level, or a stage without a ``*_modifiers`` group) into *zero*
modifiers and runs happily doing nothing; it accepts ``sparsity: 1.5`` for
SparseGPT and fails deep inside on ``mask_structure: "2-4"``; and it runs
combinations that succeed but produce nothing useful (:func:`check_combination`).
Every command of ours loads recipes through :func:`load_recipe`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from sparse_expansion_plugin.pruning.structure import check_sparsity, parse_mask_structure

SPARSE_EXPANSION = "SparseExpansionModifier"
WD_SPARSEGPT = "WassersteinSparseGPTModifier"
_INTERNAL_FIELDS = {
    "index",
    "group",
    "start",
    "end",
    "update",
    "requires_calibration_data",
    "sequential_update",
}
_INTERNAL_FIELDS |= {"initialized_", "finalized_", "started_", "ended_"}
_EXAMPLE = """sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      targets: ['Linear']
      ignore: ['re:.*lm_head']"""


def known_modifiers() -> list[str]:
    """Names a recipe may use: llm-compressor's built-ins plus ours (registered on import)."""
    from llmcompressor.modifiers.factory import ModifierFactory

    from sparse_expansion_plugin.modifiers import register_modifiers

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    register_modifiers()
    names = set(ModifierFactory._main_registry) | set(ModifierFactory._experimental_registry)
    names |= set(ModifierFactory._registered_registry)
    names.discard("Modifier")  # the abstract base
    return sorted(names)


def _read(recipe: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, dict):
        return recipe
    text = str(recipe)
    if isinstance(recipe, os.PathLike) or ("\n" not in text and ":" not in text):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {text!r} not found (pass a YAML path or a YAML string)")
        text = path.read_text()
    elif "\n" not in text and Path(text).is_file():
        text = Path(text).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"a recipe must be a YAML mapping of stages, got {type(data).__name__}:\n{_EXAMPLE}")
    return data


def _check_args(name: str, args: dict[str, Any], where: str) -> None:
    """Sparsity and mask structure through the one shared validator (``pruning.structure``).

    Checked here for llm-compressor's own modifiers too, which accept
    ``sparsity: 1.5`` and fail deep inside on ``mask_structure: "2-4"``.
    """
    try:
        if "sparsity" in args:
            values = args["sparsity"] if isinstance(args["sparsity"], list) else [args["sparsity"]]
            for value in values:
                check_sparsity(value)
        if "mask_structure" in args:
            parse_mask_structure(args["mask_structure"])
    except ValueError as error:
        raise ValueError(f"{where}: {name}.{error}") from None


def modifier_class(name: str) -> type:
    """The class a recipe's modifier ``name`` instantiates (ours registered, then llm-compressor's)."""
    from llmcompressor.modifiers.factory import ModifierFactory

    known_modifiers()  # registers ours, loads the built-ins
    cls = (
        ModifierFactory._registered_registry.get(name)
        or ModifierFactory._main_registry.get(name)
        or ModifierFactory._experimental_registry.get(name)
    )
    if cls is None:
        raise ValueError(f"unknown modifier {name!r}; known modifiers: {', '.join(known_modifiers())}")
    return cls


def is_pruning_modifier(cls: type) -> bool:
    """SparseGPT, Wanda, magnitude, constant, REAP and ours: anything that sets weights to zero."""
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

    return issubclass(cls, SparsityModifierBase) or cls.__module__.startswith(
        "llmcompressor.modifiers.pruning."
    )


def is_quantization_modifier(cls: type) -> bool:
    """QuantizationModifier, GPTQ, AutoRound (llm-compressor's ``QuantizationMixin``) and AWQ."""
    from llmcompressor.modifiers.quantization import QuantizationMixin
    from llmcompressor.modifiers.transform import AWQModifier

    return issubclass(cls, (QuantizationMixin, AWQModifier))


def check_combination(modifiers: list[tuple[str, str]]) -> None:
    """Refuse combinations that run without error and save something useless; say what works instead.

    ``modifiers``: ``(where, name)`` of every modifier of the recipe, in order.
    The whole recipe is checked, not one stage: llm-compressor 0.14 flattens
    every stage into one list of modifiers that calibrate in the same pass
    (``Recipe.from_dict``), so stages do not order or separate them.

    - Sparse Expansion with another pruning modifier: on shared linears the
      other one zeroes the weights first and all K experts come out identical
      (K times the storage for nothing). Refused for any mix rather than only
      for overlapping targets: the overlap depends on each modifier's target
      resolution on the actual model, and the two-run alternative below does
      everything a mixed recipe could.
    - A quantization modifier with Sparse Expansion or WD-aware SparseGPT: the
      saved directory does not reload (``load_expanded`` refuses the
      ``weight_scale`` keys; the WD-aware weights are saved float32 and not
      quantized, with unexpected keys on reload).
    """
    classes = [(where, name, modifier_class(name)) for where, name in modifiers]
    names = {name for _, name, _ in classes}
    if SPARSE_EXPANSION in names:
        others = [(w, n) for w, n, c in classes if n != SPARSE_EXPANSION and is_pruning_modifier(c)]
        if others:
            where, other = others[0]
            raise ValueError(
                f"{where}: {other} cannot run in one recipe with {SPARSE_EXPANSION}: llm-compressor runs "
                "all stages of a recipe in one calibration pass, so it would prune the linears Sparse "
                "Expansion expands and all experts would come out identical. What works: "
                f"{SPARSE_EXPANSION} alone (it prunes every expert itself), or two runs: first a recipe "
                f"with {other} (e.g. targets: ['re:.*self_attn.*']) saved with `sparse-expansion compress`, "
                f"then a recipe with {SPARSE_EXPANSION} on that output"
            )
    hosts = [n for n in (SPARSE_EXPANSION, WD_SPARSEGPT) if n in names]
    quantizers = [(w, n) for w, n, c in classes if is_quantization_modifier(c)]
    if hosts and quantizers:
        where, quantizer = quantizers[0]
        raise ValueError(
            f"{where}: {quantizer} cannot run in one recipe with {hosts[0]}: the saved model would not "
            "reload (unexpected weight_scale keys, or float32 weights that are not quantized). What "
            f"works: for {WD_SPARSEGPT}, compress with the pruning recipe first and run quantization as "
            "a separate recipe on the pruned dense model it saves; Sparse Expansion does not support "
            "quantization yet"
        )


def validated_recipe_dict(recipe: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The recipe as a nested dict, checked: stages, groups, modifier names and basic field values.

    Raises ``ValueError`` naming the problem and the fix, ``FileNotFoundError`` for a missing file.
    """
    data = _read(recipe)
    known = known_modifiers()
    stages = {k: v for k, v in data.items() if k.endswith("_stage")}
    strays = [k for k in data if k not in stages and k != "args"]
    if not stages or strays:
        flat = [k for k in strays if k in known or k.endswith("_modifiers")]
        what = f"top-level keys {strays} are not stages" if strays else "no '<name>_stage' key"
        hint = (
            " (a flat recipe: llm-compressor would silently apply zero modifiers)"
            if flat or not stages
            else ""
        )
        raise ValueError(
            f"{what}{hint}; nest modifiers as '<x>_stage: <y>_modifiers: Name: {{...}}', e.g.\n{_EXAMPLE}"
        )
    found: list[tuple[str, str]] = []
    for stage_name, stage in stages.items():
        if not isinstance(stage, dict) or not stage:
            raise ValueError(
                f"stage {stage_name!r} is empty; it needs a '<y>_modifiers' group, e.g.\n{_EXAMPLE}"
            )
        for group_name, group in stage.items():
            if not group_name.endswith("_modifiers") or not isinstance(group, dict):
                raise ValueError(
                    f"key {group_name!r} in stage {stage_name!r} would be ignored by llm-compressor: "
                    f"modifier groups must be mappings named '<y>_modifiers', e.g.\n{_EXAMPLE}"
                )
            for name, args in group.items():
                where = f"{stage_name}.{group_name}"
                if name not in known:
                    raise ValueError(
                        f"{where}: unknown modifier {name!r}; known modifiers: {', '.join(known)}"
                    )
                if args is None:
                    group[name] = args = {}
                if not isinstance(args, dict):
                    raise ValueError(f"{where}: {name} needs a mapping of fields, got {args!r}")
                _check_args(name, args, where)
                found.append((where, name))
    if not found:
        raise ValueError(f"recipe has no modifiers; e.g.\n{_EXAMPLE}")
    check_combination(found)
    return data


def load_recipe(recipe: str | os.PathLike[str] | dict[str, Any]):
    """Parse, validate and instantiate a recipe: a path, a YAML string or a dict -> ``llmcompressor.recipe.Recipe``.

    Pydantic checks each modifier's fields (our modifiers and llm-compressor's
    forbid unknown fields); its errors are re-raised as ``ValueError`` naming
    the modifier, the field and the fields it does know.
    """
    import copy

    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    data = copy.deepcopy(validated_recipe_dict(recipe))
    for stage in (v for k, v in data.items() if k.endswith("_stage")):
        for group in stage.values():
            for name, args in group.items():
                cls = modifier_class(name)
                fields = sorted(k for k in getattr(cls, "model_fields", {}) if k not in _INTERNAL_FIELDS)
                try:
                    cls(**{k: v for k, v in args.items() if k != "group"})  # type: ignore[misc]
                except ValidationError as error:
                    problems = "; ".join(
                        f"{'.'.join(str(p) for p in e['loc']) or name}: "
                        + ("unknown field" if e["type"] == "extra_forbidden" else e["msg"])
                        for e in error.errors()
                    )
                    raise ValueError(f"{name}: {problems}. Known fields: {', '.join(fields)}") from None
    return Recipe.from_dict(data)
