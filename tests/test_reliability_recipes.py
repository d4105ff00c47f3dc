"""Recipes that run without error but save something useless are refused at validation, saying what works.

Premise checked against stock llm-compressor: it flattens every stage of a
recipe into one list of modifiers (one calibration pass), so putting two
modifiers in different stages neither orders nor separates them.
"""

from __future__ import annotations

import pytest

from sparse_expansion_plugin.modifiers.recipes import load_recipe

SE = "SparseExpansionModifier:\n      sparsity: 0.5\n      num_experts: 2"
WD = "WassersteinSparseGPTModifier:\n      sparsity: 0.5\n      targets: ['Linear']"
SGPT = "SparseGPTModifier:\n      sparsity: 0.5\n      targets: ['Linear']"
WANDA = "WandaPruningModifier:\n      sparsity: 0.5\n      targets: ['Linear']"
FP8 = "QuantizationModifier:\n      targets: ['Linear']\n      scheme: FP8_DYNAMIC\n      ignore: ['lm_head']"
GPTQ = "GPTQModifier:\n      targets: ['Linear']\n      scheme: W4A16\n      ignore: ['lm_head']"
AWQ = "AWQModifier:\n      ignore: ['lm_head']"


def one_stage(*modifiers: str) -> str:
    return "a_stage:\n  a_modifiers:\n" + "".join(f"    {m}\n" for m in modifiers)


def two_stages(first: str, second: str) -> str:
    return f"a_stage:\n  a_modifiers:\n    {first}\nb_stage:\n  b_modifiers:\n    {second}\n"


# (id, recipe, message): every one of these ran to exit 0 before and saved an unusable model.
REFUSED = [
    ("se+sparsegpt-one-stage", one_stage(SGPT, SE), "SparseGPTModifier cannot run in one recipe with Sparse"),
    ("se+sparsegpt-two-stages", two_stages(SGPT, SE), "two runs"),
    ("se+wanda", one_stage(SE, WANDA), "WandaPruningModifier cannot run"),
    ("se+wd", two_stages(WD, SE), "experts would come out identical"),
    ("se+fp8", two_stages(SE, FP8), "Sparse Expansion does not support quantization yet"),
    ("se+gptq", one_stage(SE, GPTQ), "GPTQModifier cannot run in one recipe"),
    ("wd+fp8", one_stage(WD, FP8), "separate recipe on the pruned dense model"),
    ("wd+awq+gptq", two_stages(WD, f"{AWQ}\n    {GPTQ}"), "AWQModifier cannot run in one recipe"),
]
ACCEPTED = [
    ("se-alone", one_stage(SE)),
    ("wd-alone", one_stage(WD)),
    ("sparsegpt+fp8", two_stages(SGPT, FP8)),  # stock 2:4 + FP8 flow of llm-compressor: not ours to refuse
    ("sparsegpt+wanda", one_stage(SGPT, WANDA)),
]


@pytest.mark.parametrize(("recipe", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_useless_combinations_are_refused_naming_what_works(recipe, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize("recipe", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_combinations_that_work_are_accepted(recipe):
    assert len(load_recipe(recipe).modifiers) == recipe.count("Modifier:")


def test_premise_llmcompressor_runs_all_stages_as_one_list():
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(two_stages(SGPT, FP8))
    assert [type(m).__name__ for m in recipe.modifiers] == ["SparseGPTModifier", "QuantizationModifier"]
    assert recipe.stage == "b"  # one stage: the last one's name


@pytest.mark.parametrize(
    ("field", "value", "bad"),
    [
        ("sparsity", 1.5, 1.5),
        ("sparsity", [0.5, 2], 2),
        ("sparsity", True, True),
        ("mask_structure", "2-4", "2-4"),
        ("mask_structure", "4:2", "4:2"),
    ],
)
def test_field_errors_are_the_shared_validators(field, value, bad):
    """The recipe check says what ``pruning.structure`` (the one validator) says, for llm-compressor's modifiers too."""
    import yaml

    from sparse_expansion_plugin.pruning.structure import check_sparsity, parse_mask_structure

    with pytest.raises(ValueError) as expected:
        (check_sparsity if field == "sparsity" else parse_mask_structure)(bad)
    recipe = {"a_stage": {"a_modifiers": {"SparseGPTModifier": {field: value}}}}
    with pytest.raises(ValueError) as got:
        load_recipe(yaml.safe_dump(recipe))
    assert str(expected.value) in str(got.value) and "SparseGPTModifier" in str(got.value)
