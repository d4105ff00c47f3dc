"""Registration of our plugins: a light ``import sparse_expansion_plugin``, and recipes that still name our modifiers.

Each check runs in a fresh interpreter (``sys.modules``, ``sys.meta_path`` and
llm-compressor's ``ModifierFactory`` registry start empty). The reference for
"the recipe found our modifier" is llm-compressor's own recipe parser
(``Recipe.create_instance`` -> ``ModifierFactory.create``) returning an
instance of the class defined in our module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

RECIPE = """
sparsity_stage:
  sparsity_modifiers:
    WassersteinSparseGPTModifier:
      sparsity: 0.5
    SparseExpansionModifier:
      sparsity: 0.5
      num_experts: 2
"""

CHECK_RECIPE = f"""
import importlib
from llmcompressor.recipe import Recipe
from sparse_expansion_plugin.modifiers import MODIFIER_MODULES

recipe = Recipe.create_instance({RECIPE!r})
got = [type(m) for m in recipe.modifiers]
want = [getattr(importlib.import_module(MODIFIER_MODULES[n]), n) for n in
        ("WassersteinSparseGPTModifier", "SparseExpansionModifier")]
assert got == want, (got, want)
"""


def run_in_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter; it must exit 0. Returns the finished process (stdout, stderr)."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_import_loads_neither_llmcompressor_nor_torch():
    run = run_in_fresh_python(
        """
        import sys, time
        start = time.perf_counter()
        import sparse_expansion_plugin
        print(f"import sparse_expansion_plugin: {time.perf_counter() - start:.3f} s")
        heavy = sorted({"llmcompressor", "torch", "transformers"} & set(sys.modules))
        assert not heavy, f"importing the package imported {heavy}"
        from lm_eval.api.registry import model_registry
        assert "sparse-expansion" in model_registry, "the lm-eval model is registered on import"
        """
    )
    print(run.stdout.strip())  # the measured time (pytest -s); not asserted: it depends on the machine
    assert "No accelerator" not in run.stdout + run.stderr


@pytest.mark.parametrize(
    "imports",
    [
        "import sparse_expansion_plugin\nfrom llmcompressor import oneshot",
        "from llmcompressor import oneshot\nimport sparse_expansion_plugin",
        "import sparse_expansion_plugin\nimport llmcompressor.modifiers.factory",
    ],
    ids=["ours-first", "llmcompressor-first", "ours-then-factory-module"],
)
def test_yaml_recipe_finds_our_modifiers_in_either_import_order(imports):
    run_in_fresh_python(imports + "\n" + CHECK_RECIPE)


def test_import_hook_is_one_shot_and_registration_idempotent():
    run_in_fresh_python(
        """
        import sys
        import sparse_expansion_plugin
        from sparse_expansion_plugin import modifiers

        def hooks():
            return [f for f in sys.meta_path if type(f).__name__ == "_RegisterOnImport"]

        modifiers.register_modifiers_when_llmcompressor_loads()  # a second call adds no second hook
        assert len(hooks()) == 1, sys.meta_path
        import llmcompressor
        assert hooks() == [], "the hook must remove itself once llm-compressor is imported"
        from llmcompressor.modifiers.factory import ModifierFactory
        before = dict(ModifierFactory._registered_registry)
        assert set(modifiers.MODIFIER_MODULES) <= set(before)
        modifiers.register_modifiers()
        modifiers.register_modifiers_when_llmcompressor_loads()
        assert ModifierFactory._registered_registry == before
        assert hooks() == []
        """
    )


def test_a_broken_modifier_module_warns_and_does_not_break_llmcompressor_import():
    run = run_in_fresh_python(
        """
        import warnings
        import sparse_expansion_plugin
        from sparse_expansion_plugin import modifiers
        modifiers.MODIFIER_MODULES["NoSuchModifier"] = "sparse_expansion_plugin.no_such_module"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from llmcompressor import oneshot
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert any("NoSuchModifier" in m and "no_such_module" in m for m in messages), messages
        from llmcompressor.modifiers.factory import ModifierFactory
        assert "WassersteinSparseGPTModifier" in ModifierFactory._registered_registry
        """
    )
    assert run.returncode == 0
