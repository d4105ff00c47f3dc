"""``sparse-expansion-lm-eval``: one process vs ``accelerate launch`` data parallelism, and its errors.

Reference for the data-parallel run: the same CLI in one process (and the
sample count: every window scored exactly once across the two processes).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_lm_eval import save_tiny
from transformers import AutoTokenizer

from sparse_expansion_plugin.evaluation.lm_eval_cli import TASKS_DIR, _with_our_tasks, main

TASK = "sparse_expansion_token_perplexity"
WINDOWS = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    path = tmp_path_factory.mktemp("tiny_cli")
    save_tiny(path, AutoTokenizer.from_pretrained(smollm2_dir), seed=3)
    return path


def cli_args(model_dir: Path, out: Path) -> list[str]:
    return [
        "--model",
        "sparse-expansion",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        TASK,
        "--metadata",
        "seq_len=32",
        f"num_windows={WINDOWS}",
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(out),
    ]


def free_port() -> int:
    """A TCP port nobody listens on now (so parallel runs do not collide on torchrun's default 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_run(out: Path) -> tuple[float, int]:
    """(token perplexity, number of scored samples) of one ``--output_path``."""
    (results,) = glob.glob(f"{out}/**/results_*.json", recursive=True)
    (samples,) = glob.glob(f"{out}/**/samples_{TASK}_*.jsonl", recursive=True)
    value = json.loads(Path(results).read_text())["results"][TASK]["token_perplexity,none"]
    with open(samples) as handle:
        return value, sum(1 for _ in handle)


def test_accelerate_two_processes_equal_one_process(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sparse-expansion-lm-eval"])
    assert main(cli_args(tiny_dir, tmp_path / "one")) == 0
    single, single_samples = read_run(tmp_path / "one")

    # --multi_gpu makes accelerate start N processes; on a CPU-only machine our CLI then asks
    # accelerate for a multi-CPU (gloo) group. (`accelerate launch --cpu` starts one process.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port())]
    command += ["-m", "sparse_expansion_plugin.evaluation.lm_eval_cli", *cli_args(tiny_dir, tmp_path / "two")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on rank 1" in run.stderr, "the second process did not take part"
    parallel, parallel_samples = read_run(tmp_path / "two")
    assert single_samples == parallel_samples == WINDOWS
    assert parallel == pytest.approx(single, rel=1e-6)


def test_unknown_task_is_a_clear_error(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sparse-expansion-lm-eval"])
    code = main(
        ["--model", "sparse-expansion", "--model_args", f"pretrained={tiny_dir}", "--tasks", "no_such_task"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Tasks not found: no_such_task" in err and TASK in err


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sparse-expansion-lm-eval"])
    code = main(
        ["--model", "sparse-expansion", "--model_args", f"pretrained={tmp_path / 'gone'}", "--tasks", TASK]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_our_tasks_are_added_next_to_a_users_include_path():
    args = argparse.Namespace(command="run", include_path="/my/tasks")
    _with_our_tasks(args)
    assert args.include_path == [str(TASKS_DIR), "/my/tasks"]
    args = argparse.Namespace(command="run", include_path=None)
    _with_our_tasks(args)
    assert args.include_path == str(TASKS_DIR)
