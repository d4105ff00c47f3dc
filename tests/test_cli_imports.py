"""``sparse-expansion --help`` and each sub-command's ``--help`` stay light: no llm-compressor, transformers or torch.

Each check runs in a fresh interpreter (a module imported by an earlier test
would hide an import). The reference is ``sys.modules`` itself after the help
was printed; the time is measured and bounded generously (the machine is
shared), the absence of the heavy modules is what keeps it fast.
"""

from __future__ import annotations

import json

import pytest
from test_registration import run_in_fresh_python

from sparse_expansion_plugin.cli import COMMANDS

HEAVY = ("llmcompressor", "transformers", "torch", "datasets", "compressed_tensors")

CHECK = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from sparse_expansion_plugin.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main({argv!r})
seconds = time.perf_counter() - start
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps({{"code": code, "seconds": seconds, "heavy": heavy, "help": out.getvalue()}}))
"""


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in COMMANDS]], ids=" ".join)
def test_help_imports_nothing_heavy(argv):
    run = run_in_fresh_python(CHECK.format(argv=argv, heavy=HEAVY))
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["heavy"] == [], f"--help imported {sorted({m.split('.')[0] for m in result['heavy']})}"
    assert "usage: sparse-expansion" in result["help"]
    assert "No accelerator available" not in run.stdout + run.stderr
    assert result["seconds"] < 10, result["seconds"]
