"""``benchmarks/gpu_check.py``: its exit without CUDA, a dry run of every row on CPU, and its guards.

The dry run (``--device cpu --quick`` on a tiny random Llama) checks that the code of each row runs
end to end and that the reported perplexity is the package's ``token_perplexity`` of the saved
expanded model (the lm-eval path against the bare loop); timings are not checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import benchmark_module
from test_lm_eval import save_tiny
from transformers import AutoTokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    with benchmark_module("gpu_check") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpu_check")
    save_tiny(path, AutoTokenizer.from_pretrained(smollm2_dir), seed=3)
    return path


def test_without_cuda_it_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "no CUDA device: nothing to check"


def test_dry_run_on_cpu_fills_every_row(gpu_check, tiny_dir, tmp_path, monkeypatch, capsys):
    """Every row runs; the lm-eval perplexity equals token_perplexity of the saved expanded model."""
    from sparse_expansion_plugin.data.text import token_windows
    from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
    from sparse_expansion_plugin.sparse_expansion.model import load_expanded

    saved: list[Path] = []
    save = gpu_check.GpuCheck.compress_expanded

    def keep_dir(self, row):  # a copy of the expanded directory (main removes its own) for the reference
        save(self, row)
        saved.append(Path(shutil.copytree(self.expanded_dir, tmp_path / "expanded")))

    monkeypatch.setattr(gpu_check.GpuCheck, "compress_expanded", keep_dir)
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--model", str(tiny_dir), "--output", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {row["check"]: row for row in report["rows"]}
    assert code == 0 and all(row["error"] is None for row in rows.values()), rows
    assert len(rows) == 6 and all(row["check"] in table for row in rows.values())
    assert table.count("\n| ") == 7  # header + six rows, one markdown table
    compress = rows[next(name for name in rows if name.startswith("oneshot"))]["values"]
    assert compress["sparse_expansion_s"] > 0 and compress["sparsegpt_s"] > 0
    (ppl,) = [row["values"] for name, row in rows.items() if name.startswith("lm-eval")]
    sizes = gpu_check.QUICK
    model = load_expanded(saved[0], device="cpu").eval()
    windows = token_windows(
        AutoTokenizer.from_pretrained(tiny_dir), "evaluation", sizes.ppl_len, sizes.ppl_windows
    )
    assert ppl["cpu"] == pytest.approx(token_perplexity(model, windows), rel=1e-4)
    assert ppl["relative_difference"] == 0.0  # both "devices" are the CPU in a dry run


def test_a_failing_row_is_reported_and_the_rest_still_run(gpu_check, monkeypatch, capsys):
    def broken(self, row):
        raise ValueError("no such kernel\nsecond line")

    monkeypatch.setattr(gpu_check.GpuCheck, "compress_expanded", broken)
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 1
    table = capsys.readouterr().out
    assert "| **error** | ValueError: no such kernel |" in table and "second line" not in table
    assert table.count("RuntimeError: no expanded model (its oneshot failed or was stopped)") == 5


def test_the_time_guard_stops_a_running_row(gpu_check, monkeypatch, capsys):
    import time

    def slow(self, row):
        time.sleep(30)

    monkeypatch.setattr(gpu_check.GpuCheck, "compress_expanded", slow)
    start = time.monotonic()
    assert gpu_check.main(["--device", "cpu", "--quick", "--time-limit", "1"]) == 1
    assert time.monotonic() - start < 10
    assert "stopped by the global time guard after 1 s" in capsys.readouterr().out
