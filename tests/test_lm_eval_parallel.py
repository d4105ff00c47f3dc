"""lm-eval at scale on a CPU-only machine: ``parallelize=True`` device maps and ``batch_size=auto``.

What a CPU-only machine can split a model across: accelerate's device maps know GPU indices,
``"cpu"`` and ``"disk"``, so ``parallelize=True`` with a ``max_cpu_memory`` below the model's size
puts the first decoder layers in memory and the rest on disk (offloaded, onloaded per forward by
accelerate's hooks). That is the same dispatch code a multi-GPU split runs, with disk standing in
for the second device. References: the single-device lm-eval run of the same directory and
``token_perplexity`` on the in-memory model that was saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from test_lm_eval import SEQ_LEN, TOKEN_TASK, WINDOWS, save_tiny
from transformers import AutoTokenizer

from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.evaluation.lm_eval_cli import TASKS_DIR
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

METADATA = {"seq_len": SEQ_LEN, "num_windows": WINDOWS}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, torch.nn.Module]]:
    """{"dense": (dir, model), "expanded": (dir, model)}: tiny models over SmolLM2's vocabulary."""
    from test_save_load import expand_randomly  # the save/load tests' random expansion (block API)

    from sparse_expansion_plugin.sparse_expansion.model import save_expanded

    dense_dir = tmp_path_factory.mktemp("dense")
    dense = save_tiny(dense_dir, tokenizer, seed=5)
    model = make_tiny_llama(seed=6, layers=4, vocab=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = None
    expand_randomly(model, num_experts=3).eval()
    expanded_dir = save_expanded(model, tokenizer, tmp_path_factory.mktemp("expanded") / "model")
    return {"dense": (dense_dir, dense.eval()), "expanded": (expanded_dir, model)}


def reference(model: torch.nn.Module, tokenizer) -> float:
    return token_perplexity(model, token_windows(tokenizer, "evaluation", SEQ_LEN, WINDOWS), batch_size=5)


def lm_eval_token_ppl(lm, path: Path) -> float:
    """lm-eval's own ``simple_evaluate`` of the token task on an already-built model object."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    metadata = METADATA | {"pretrained": str(path)}  # the task tokenises the windows with this tokenizer
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TOKEN_TASK], task_manager=task_manager, metadata=metadata)
    return out["results"][TOKEN_TASK]["token_perplexity,none"]


def half_the_layers_in_memory(model: torch.nn.Module) -> int:
    """A CPU budget for embeddings, the first half of the decoder layers and accelerate's reserve.

    accelerate keeps room for the largest offloaded module (here ``lm_head``) on the main device, and
    fills the budget in module order; the remaining layers, norm and ``lm_head`` go to disk.
    """

    def size(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    layers = model.model.layers
    kept = sum(size(layer) for layer in layers[: len(layers) // 2])
    return size(model.model.embed_tokens) + size(model.lm_head) + kept + 1024


@pytest.mark.parametrize("kind", ["dense", "expanded"])
def test_parallelize_splits_layers_across_memory_and_disk_with_the_same_perplexity(
    saved, tokenizer, tmp_path, kind
):
    """``parallelize=True`` with a ``max_cpu_memory`` for half the layers: decoder layers on two
    "devices" (cpu and disk), and lm-eval's token perplexity equals the single-device run's."""
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM
    from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears

    path, model = saved[kind]
    args = {"pretrained": str(path), "dtype": "float32"}
    split = args | {
        "parallelize": True,
        "max_cpu_memory": half_the_layers_in_memory(model),
        "offload_folder": str(tmp_path / "offload"),
    }
    lm = SparseExpansionLM(device="cpu", batch_size=4, **split)
    layers = {
        name: device for name, device in lm.model.hf_device_map.items() if name.startswith("model.layers.")
    }
    assert {"disk"} < set(layers.values()) and len(set(layers.values())) > 1, lm.model.hf_device_map
    if kind == "expanded":
        assert len(expanded_linears(lm.model)) == 12
    split_value = lm_eval_token_ppl(lm, path)
    single_value = lm_eval_token_ppl(SparseExpansionLM(device="cpu", batch_size=4, **args), path)
    assert split_value == pytest.approx(single_value, rel=1e-6)
    assert single_value == pytest.approx(reference(model, tokenizer), rel=1e-4)


@pytest.mark.parametrize("kind", ["dense", "expanded"])
def test_batch_size_auto_detects_a_batch_and_gives_the_same_perplexity(saved, tokenizer, kind):
    """``batch_size=auto``: lm-eval probes batches of the longest request (5 forwards each) and the
    result equals the reference; the detected size is the cap (nothing runs out of memory here)."""
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    path, model = saved[kind]
    lm = SparseExpansionLM(
        pretrained=str(path), device="cpu", dtype="float32", batch_size="auto", max_batch_size=8
    )
    value = lm_eval_token_ppl(lm, path)
    assert lm.batch_sizes == {0: 8}  # one schedule slot, detected at the cap
    assert value == pytest.approx(reference(model, tokenizer), rel=1e-4)


@pytest.mark.parametrize("batch_size", ["4", "auto:1"])
def test_accelerate_data_parallel_on_an_expanded_dir_equals_one_process(
    saved, tmp_path, monkeypatch, batch_size
):
    """Two processes under ``accelerate launch`` (gloo on CPU) each load the expanded directory, score
    half of the windows, and the gathered perplexity equals the one-process run's; with
    ``batch_size=auto`` the processes agree on a batch size through lm-eval's all_gather."""
    import os
    import subprocess
    import sys

    from test_lm_eval_cli import WINDOWS as CLI_WINDOWS
    from test_lm_eval_cli import cli_args, free_port, read_run

    from sparse_expansion_plugin.evaluation.lm_eval_cli import main

    def args(out: Path) -> list[str]:
        listed = cli_args(path, out)
        listed[listed.index("--batch_size") + 1] = batch_size
        return [*listed, "--max_batch_size", "4"]  # auto: two batches of the 8 windows per process

    path, _ = saved["expanded"]
    monkeypatch.setattr(sys, "argv", ["sparse-expansion-lm-eval"])
    assert main(cli_args(path, tmp_path / "one")) == 0
    single, single_samples = read_run(tmp_path / "one")

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port())]
    command += ["-m", "sparse_expansion_plugin.evaluation.lm_eval_cli", *args(tmp_path / "two")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on rank 1" in run.stderr, "the second process did not take part"
    if batch_size.startswith("auto"):
        assert run.stdout.count("Determined largest batch size: 4") == 2, run.stdout[-2000:]
    parallel, parallel_samples = read_run(tmp_path / "two")
    assert single_samples == parallel_samples == CLI_WINDOWS
    assert parallel == pytest.approx(single, rel=1e-6)
