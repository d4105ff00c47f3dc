"""Load and validate llm-compressor recipes, failing loudly where llm-compressor is silent.

Why: llm-compressor 0.14 turns a flat recipe (``SparseGPTModifier: {...}`` at
the top level, or a stage without a ``*_modifiers`` group) into *zero*
modifiers and runs happily doing nothing; it accepts ``sparsity: 1.5`` for
SparseGPT and fails deep inside on ``mask_structure: "2-4"``. Every command of
ours loads recipes through :func:`load_recipe`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

_MASK = re.compile(r"^\s*(\d+):(\d+)\s*$")
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
    """Checks llm-compressor does not make (or makes with an unreadable error)."""
    if "sparsity" in args:
        values = args["sparsity"] if isinstance(args["sparsity"], list) else [args["sparsity"]]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{where}: {name}.sparsity must be a number in [0, 1), got {args['sparsity']!r}"
                )
    if "mask_structure" in args:
        match = _MASK.match(str(args["mask_structure"]))
        ok = match is not None
        if ok:
            n, m = int(match.group(1)), int(match.group(2))  # type: ignore[union-attr]
            ok = (n, m) == (0, 0) or 0 < n < m
        if not ok:
            raise ValueError(
                f"{where}: {name}.mask_structure must be 'N:M' with 0 < N < M (N zeros in every M "
                f"weights, e.g. '2:4') or '0:0' for unstructured, got {args['mask_structure']!r}"
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
    count = 0
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
                count += 1
    if count == 0:
        raise ValueError(f"recipe has no modifiers; e.g.\n{_EXAMPLE}")
    return data


def load_recipe(recipe: str | os.PathLike[str] | dict[str, Any]):
    """Parse, validate and instantiate a recipe: a path, a YAML string or a dict -> ``llmcompressor.recipe.Recipe``.

    Pydantic checks each modifier's fields (our modifiers and llm-compressor's
    forbid unknown fields); its errors are re-raised as ``ValueError`` naming
    the modifier, the field and the fields it does know.
    """
    import copy

    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    data = copy.deepcopy(validated_recipe_dict(recipe))
    for stage in (v for k, v in data.items() if k.endswith("_stage")):
        for group in stage.values():
            for name, args in group.items():
                cls = ModifierFactory._registered_registry.get(name)
                if cls is None:
                    ModifierFactory.refresh()
                    cls = ModifierFactory._main_registry.get(
                        name
                    ) or ModifierFactory._experimental_registry.get(name)
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
