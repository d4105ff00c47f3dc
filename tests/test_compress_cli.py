"""``sparse-expansion compress``: every SparseGPT recipe in recipes/ runs and saves a reloadable model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparse_expansion_plugin.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OUR_RECIPES = sorted(p.name for p in RECIPES.glob("*sparsegpt_*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(seed=1, hidden=64, intermediate=128, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }


def test_there_are_recipes_for_each_mode():
    assert {"sparsegpt_50.yaml", "sparsegpt_70.yaml", "sparsegpt_2of4.yaml"} <= set(OUR_RECIPES)
    assert {"wd_sparsegpt_50.yaml", "wd_sparsegpt_70.yaml", "wd_sparsegpt_2of4.yaml"} <= set(OUR_RECIPES)


@pytest.mark.parametrize("recipe", OUR_RECIPES)
def test_recipe_compresses_and_reloads_with_plain_transformers(tiny_dir, tmp_path, recipe):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    argv = ["compress", str(tiny_dir), "--recipe", str(RECIPES / recipe), "--output", str(output)]
    assert main([*argv, "--num-calibration-samples", "4", "--seq-len", "64"]) == 0
    spec = yaml.safe_load((RECIPES / recipe).read_text())["sparsity_stage"]["sparsity_modifiers"]
    ((name, fields),) = spec.items()
    saved = yaml.safe_load((output / "recipe.yaml").read_text())
    assert name in saved["sparsity_stage"]["sparsity_modifiers"]
    model = AutoModelForCausalLM.from_pretrained(output)  # plain transformers, no remote code
    weights = _linear_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    numel = sum(w.numel() for w in weights.values())
    if fields.get("mask_structure", "0:0") == "2:4":
        for w in weights.values():
            assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    else:
        assert abs(zeros / numel - fields["sparsity"]) < 0.01
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert bool(torch.isfinite(logits).all())
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind


def test_refuses_existing_output_without_overwrite(tiny_dir, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    argv = [
        "compress",
        str(tiny_dir),
        "--recipe",
        str(RECIPES / "sparsegpt_50.yaml"),
        "--output",
        str(output),
    ]
    assert main([*argv, "--num-calibration-samples", "2", "--seq-len", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "precious"
    # Not ours (no marker): --overwrite does not replace it either.
    assert main([*argv, "--num-calibration-samples", "2", "--seq-len", "32", "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_an_output_we_wrote(tiny_dir, tmp_path):
    output = tmp_path / "out"
    argv = [
        "compress",
        str(tiny_dir),
        "--recipe",
        str(RECIPES / "sparsegpt_50.yaml"),
        "--output",
        str(output),
    ]
    argv += ["--num-calibration-samples", "2", "--seq-len", "32"]
    assert main(argv) == 0
    first = (output / "model.safetensors").read_bytes()
    argv[3] = str(RECIPES / "sparsegpt_70.yaml")
    assert main(argv) == 2  # exists: refused without --overwrite
    assert main([*argv, "--overwrite"]) == 0
    assert (output / "config.json").is_file() and (output / "model.safetensors").read_bytes() != first


TWO_STAGES = r"""attention_stage:
  attention_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      targets: ['re:.*self_attn\..*_proj$']
mlp_stage:
  mlp_modifiers:
    WassersteinSparseGPTModifier:
      sparsity: 0.7
      targets: ['re:.*mlp\..*_proj$']
"""


def test_saved_directory_says_exactly_what_produced_it(tiny_dir, tmp_path):
    """Both stages under their own names, the CLI seed and calibration recorded; rerunning from them reproduces it."""
    import json

    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_STAGES)
    settings = [
        "--seed",
        "3",
        "--num-calibration-samples",
        "3",
        "--seq-len",
        "48",
        "--calibration-text",
        "jargon_file",
    ]
    argv = ["compress", str(tiny_dir), "--recipe", str(recipe), "--output", str(tmp_path / "out"), *settings]
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved == yaml.safe_load(TWO_STAGES)
    record = json.loads((tmp_path / "out" / "sparse_expansion_run.json").read_text())
    assert record["argv"] == ["sparse-expansion", *argv]
    assert record["seed"] == 3
    assert record["calibration"] == {
        "num_samples": 3,
        "seq_len": 48,
        "sources": ["jargon_file"],
        "split": "calibration",
    }
    assert [m["type"] for m in record["modifiers"]] == ["SparseGPTModifier", "WassersteinSparseGPTModifier"]
    assert [m["fields"]["sparsity"] for m in record["modifiers"]] == [0.5, 0.7]
    assert record["versions"]["llmcompressor"].startswith("0.14")
    # What the directory records is enough to make it again, bit for bit.
    again = [
        "compress",
        record["model_location"],
        "--recipe",
        str(tmp_path / "out" / "recipe.yaml"),
        "--output",
        str(tmp_path / "again"),
        "--seed",
        str(record["seed"]),
        "--num-calibration-samples",
        str(record["calibration"]["num_samples"]),
        "--seq-len",
        str(record["calibration"]["seq_len"]),
        "--calibration-text",
        ",".join(record["calibration"]["sources"]),
    ]
    assert main(again) == 0
    first, second = (tmp_path / d / "model.safetensors" for d in ("out", "again"))
    assert first.read_bytes() == second.read_bytes()


def test_bad_recipe_fails_before_loading_the_model(tmp_path, capsys):
    flat = tmp_path / "flat.yaml"
    flat.write_text("SparseGPTModifier:\n  sparsity: 0.5\n")
    argv = ["compress", "/nonexistent/model", "--recipe", str(flat), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "_stage" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


SE_RECIPES = sorted(p.name for p in RECIPES.glob("sparse_expansion_*.yaml"))


@pytest.mark.parametrize("recipe", SE_RECIPES)
def test_sparse_expansion_recipes_compress_save_and_report_expert_zeros(tiny_dir, tmp_path, recipe, caplog):
    """A Sparse Expansion recipe through the CLI: saved as an expanded model that reloads by both routes,
    and the logged share of zeros counts every expert (0.1.0 counted attention's nn.Linear only)."""
    import logging
    import re

    from transformers import AutoModelForCausalLM

    from sparse_expansion_plugin.sparse_expansion import is_expanded, load_expanded
    from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear

    caplog.set_level(logging.INFO, logger="sparse_expansion_plugin")
    small = tmp_path / recipe
    small.write_text((RECIPES / recipe).read_text().replace("num_experts: 16", "num_experts: 4"))
    output = tmp_path / "out"
    argv = ["compress", str(tiny_dir), "--recipe", str(small), "--output", str(output)]
    assert main([*argv, "--num-calibration-samples", "4", "--seq-len", "64"]) == 0
    model = load_expanded(output)
    remote = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert is_expanded(model) and is_expanded(remote)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, remote(input_ids=ids).logits)
    zeros = total = layers = 0  # by hand, from each expert's dense weight
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, ExpandedLinear):
            for k in range(module.num_experts):
                weight = module.expert_weight(k)
                zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
            layers += 1
        elif isinstance(module, torch.nn.Linear):
            zeros, total, layers = (
                zeros + int((module.weight == 0).sum()),
                total + module.weight.numel(),
                layers + 1,
            )
    logged = re.search(r"\(([\d.]+)% zeros in (\d+) linear layers\)", caplog.text)
    assert logged is not None
    assert int(logged.group(2)) == layers
    assert abs(float(logged.group(1)) - 100 * zeros / total) < 0.01
    assert float(logged.group(1)) > 30  # the experts' zeros dominate (attention stays dense)


@pytest.mark.slow
def test_wd_recipe_on_smollm2(tmp_path):
    """The real model end to end with few tokens: compress, reload with plain transformers, finite perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_expansion_plugin.data import token_windows
    from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

    output = tmp_path / "wd50"
    argv = [
        "compress",
        "smollm2-135m",
        "--recipe",
        str(RECIPES / "wd_sparsegpt_50.yaml"),
        "--output",
        str(output),
    ]
    assert main([*argv, "--num-calibration-samples", "4", "--seq-len", "128"]) == 0
    model = AutoModelForCausalLM.from_pretrained(output)
    weights = _linear_weights(model)
    sparsity = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert abs(sparsity - 0.5) < 0.005
    windows = token_windows(AutoTokenizer.from_pretrained(output), "evaluation", 128, 2)
    assert token_perplexity(model, windows, progress=False) < 1000
