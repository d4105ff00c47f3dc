"""A modifier module imported first in a process (before llm-compressor) must still be found by name.

Its own import of llm-compressor fires the registration hook while the module is half-executed;
the module then registers itself once its class exists. Checked in fresh interpreters, against
llm-compressor's own recipe parsing (a YAML naming the modifier must build it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("sparse_expansion_plugin.wd_sparsegpt.modifier", "WassersteinSparseGPTModifier"),
    ("sparse_expansion_plugin.sparse_expansion.modifier", "SparseExpansionModifier"),
]


@pytest.mark.parametrize("module,name", CASES, ids=[c[1] for c in CASES])
def test_modifier_imported_first_is_registered(module, name):
    code = f"""
import warnings
warnings.simplefilter("error", RuntimeWarning)
from {module} import {name}
from llmcompressor.recipe import Recipe
recipe = Recipe.create_instance('''s_stage:
  s_modifiers:
    {name}:
      sparsity: 0.5
''')
assert [type(m).__name__ for m in recipe.modifiers] == ["{name}"], recipe.modifiers
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
