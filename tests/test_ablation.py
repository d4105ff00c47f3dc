"""Negative-computation ablation: selection, hooks, the sweep, and the ``ablate`` command.

References are independent: hand-counted sizes, numpy argsort, a hand-written
gated MLP with the clamp done inline, and perplexity of a model whose MLP
forward is replaced by that slow version.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_expansion_plugin.analysis.ablation import (
    ablate_neurons,
    ablation_targets,
    activation_of,
    check_percent,
    evaluate_ablation,
    neuron_count,
    pre_post_activations,
    select_neurons,
    select_per_layer,
)
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
from sparse_expansion_plugin.outputs import MARKER

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_llama  # noqa: E402


def windows(n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# --- selection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "expected"), [(0.5, 8), (1, 15), (2, 31), (5, 77), (100, 1536), (0.01, 1)]
)
def test_counts_are_exact_for_smollm2_width(percent, expected):
    # 1536 * p / 100 rounded half up, by hand: 7.68 -> 8, 15.36 -> 15, 30.72 -> 31, 76.8 -> 77; at least 1.
    scores = torch.randn(1536, generator=torch.Generator().manual_seed(1))
    assert neuron_count(1536, percent) == expected
    for selection in ("top", "bottom", "random"):
        chosen = select_neurons(scores, percent, selection, torch.Generator().manual_seed(0))
        assert chosen.numel() == expected
        assert torch.unique(chosen).numel() == expected


def test_top_and_bottom_match_numpy_argsort():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(2)).double()
    order = np.argsort(-scores.numpy(), kind="stable")
    assert select_neurons(scores, 5, "top").tolist() == sorted(order[:10].tolist())
    order = np.argsort(scores.numpy(), kind="stable")
    assert select_neurons(scores, 5, "bottom").tolist() == sorted(order[:10].tolist())


def test_nan_scores_are_never_selected():
    scores = torch.tensor([float("nan"), 1.0, 2.0, float("nan"), 0.5])
    assert select_neurons(scores, 40, "top").tolist() == [1, 2]
    assert select_neurons(scores, 40, "bottom").tolist() == [1, 4]


def test_random_selection_is_seeded():
    scores = {f"l{i}": torch.randn(300) for i in range(3)}
    a = select_per_layer(scores, 2, "random", seed=7)
    b = select_per_layer(scores, 2, "random", seed=7)
    c = select_per_layer(scores, 2, "random", seed=8)
    assert all(torch.equal(a[k], b[k]) for k in scores)
    assert any(not torch.equal(a[k], c[k]) for k in scores)
    assert all(a[k].numel() == 6 for k in scores)
    # the layers do not all get the same draw
    assert not torch.equal(a["l0"], a["l1"])


@pytest.mark.parametrize("percent", [0, -1, 100.5, float("nan"), 1e9])
def test_percent_outside_range_is_rejected(percent):
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        check_percent(percent)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        select_neurons(torch.randn(10), percent, "top")


def test_unknown_selection_and_mode():
    with pytest.raises(ValueError, match="unknown selection"):
        select_neurons(torch.randn(10), 10, "middle")
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="unknown ablation mode"):
        with ablate_neurons(model, {}, "zero"):
            pass


def test_model_without_ffn_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no feed-forward projections"):
        ablation_targets(model)


def test_unknown_module_and_out_of_range_neuron():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="no module named"):
        with ablate_neurons(model, {"model.layers.0.mlp.gate": torch.tensor([0])}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with ablate_neurons(model, {"model.layers.0.mlp.gate_proj": torch.tensor([64])}):
            pass


# --- hooks ------------------------------------------------------------------------------------


def test_targets_are_the_gates():
    assert ablation_targets(make_tiny_llama(layers=3)) == [
        f"model.layers.{i}.mlp.gate_proj" for i in range(3)
    ]


def record_outputs(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Output of module ``name`` seen by the *next* hook in line (i.e. after any ablation hook)."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone())
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("mode", ["clamp", "flip"])
def test_hooks_change_only_selected_neurons(mode):
    model = make_tiny_llama()
    ids = windows()
    name = "model.layers.0.mlp.gate_proj"
    chosen = torch.tensor([3, 17, 40])
    before = record_outputs(model, name, ids)
    assert (before[..., chosen] < 0).any()  # the test is only meaningful if something is clamped
    with ablate_neurons(model, {name: chosen}, mode):
        after = record_outputs(model, name, ids)
    others = torch.ones(before.shape[-1], dtype=torch.bool)
    others[chosen] = False
    assert torch.equal(after[..., others], before[..., others])  # bit-identical
    expected = before[..., chosen].clamp_min(0) if mode == "clamp" else -before[..., chosen]
    assert torch.equal(after[..., chosen], expected)


def slow_gated_mlp(mlp: nn.Module, x: torch.Tensor, chosen: list[int], mode: str) -> torch.Tensor:
    """A Llama MLP written out by hand with the ablation applied inline, neuron by neuron."""
    gate = x @ mlp.gate_proj.weight.T
    for j in chosen:
        gate[..., j] = torch.where(gate[..., j] < 0, 0.0, gate[..., j]) if mode == "clamp" else -gate[..., j]
    return (F.silu(gate) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


@pytest.mark.parametrize("mode", ["clamp", "flip"])
def test_mlp_under_hooks_matches_slow_reference(mode):
    model = make_tiny_llama()
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    chosen = [0, 9, 63]
    with torch.no_grad(), ablate_neurons(model, {"model.layers.1.mlp.gate_proj": torch.tensor(chosen)}, mode):
        got = mlp(x)
    torch.testing.assert_close(got, slow_gated_mlp(mlp, x.clone(), chosen, mode))
    with torch.no_grad():
        assert not torch.allclose(got, mlp(x))


def test_hooks_are_gone_after_exit_and_weights_untouched():
    model = make_tiny_llama()
    ids = windows()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    selection = {n: torch.arange(10) for n in ablation_targets(model)}
    with torch.no_grad():
        with ablate_neurons(model, selection, "clamp"):
            ablated = model(input_ids=ids).logits
            assert all(len(model.get_submodule(n)._forward_hooks) == 1 for n in selection)
        after = model(input_ids=ids).logits
    assert not torch.allclose(ablated, reference)
    assert torch.equal(after, reference)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_hooks_are_removed_on_error():
    model = make_tiny_llama()
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_neurons(model, {ablation_targets(model)[0]: torch.tensor([1])}):
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_clamp_of_never_negative_neuron_changes_nothing():
    model = make_tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.rand(2, 6, 32, generator=torch.Generator().manual_seed(4))  # all inputs > 0
    with torch.no_grad():
        mlp.gate_proj.weight[5] = mlp.gate_proj.weight[5].abs() + 0.01  # so neuron 5 is > 0 on x
        assert (x @ mlp.gate_proj.weight[5] > 0).all()
        reference = mlp(x)
        with ablate_neurons(model, {"model.layers.0.mlp.gate_proj": torch.tensor([5])}, "clamp"):
            assert torch.equal(mlp(x), reference)
        # whole model: a neuron that is exactly zero everywhere
        mlp.gate_proj.weight[7] = 0.0
        ids = windows()
        logits = model(input_ids=ids).logits
        with ablate_neurons(model, {"model.layers.0.mlp.gate_proj": torch.tensor([7])}, "clamp"):
            assert torch.equal(model(input_ids=ids).logits, logits)


# --- the sweep --------------------------------------------------------------------------------


def perplexity_with_slow_mlps(model, ids, selection, mode):
    """Token perplexity with every MLP's forward replaced by ``slow_gated_mlp`` (the reference)."""
    saved = {}
    for name, chosen in selection.items():
        mlp = model.get_submodule(name.rsplit(".", 1)[0])
        saved[mlp] = mlp.forward
        neurons = chosen.tolist()
        mlp.forward = types.MethodType(
            lambda self, x, c=neurons: slow_gated_mlp(self, x.clone(), c, mode), mlp
        )
    try:
        return token_perplexity(model, ids, batch_size=2, progress=False)
    finally:
        for mlp, forward in saved.items():
            mlp.forward = forward


def test_evaluate_ablation_table_matches_slow_reference():
    model = make_tiny_llama(layers=2)
    ids = windows(4, 16)
    targets = ablation_targets(model)
    scores = {n: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(targets)}
    table = evaluate_ablation(
        model,
        ids,
        scores,
        [2, 10],
        modes=["clamp", "flip"],
        seed=3,
        random_repeats=2,
        batch_size=2,
        progress=False,
    )
    assert len(table.rows) == 2 * 2 * (1 + 2 + 1)
    assert table.baseline_perplexity == pytest.approx(
        token_perplexity(model, ids, 2, progress=False), rel=1e-12
    )
    for row in table.rows:
        assert row.neurons_per_layer == {2: 1, 10: 6}[row.percent]  # 64 * 2% = 1.28 -> 1; 6.4 -> 6
        selection = select_per_layer(scores, row.percent, row.selection, row.seed)
        expected = perplexity_with_slow_mlps(model, ids, selection, row.mode)
        assert row.perplexity == pytest.approx(expected, rel=1e-5)
        assert row.ratio_to_baseline == pytest.approx(row.perplexity / table.baseline_perplexity)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    text = table.markdown()
    assert "| clamp | 10 | 6 |" in text and "(n=2)" in text


def test_evaluate_ablation_rejects_bad_input():
    model = make_tiny_llama()
    ids = windows()
    scores = {ablation_targets(model)[0]: torch.randn(64)}
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        evaluate_ablation(model, ids, scores, [0.0], progress=False)
    with pytest.raises(ValueError, match="scores is empty"):
        evaluate_ablation(model, ids, {}, [1.0], progress=False)


def test_pre_post_activations_use_the_models_activation():
    model = make_tiny_llama()
    ids = windows()
    name = "model.layers.1.mlp.gate_proj"
    assert activation_of(model, name) is model.model.layers[1].mlp.act_fn
    pre, post = pre_post_activations(model, ids, name, torch.tensor([4, 2]), batch_size=2)
    full = record_outputs(model, name, ids).reshape(-1, 64)
    assert pre.shape == (ids.numel(), 2)
    torch.testing.assert_close(pre, full[:, [4, 2]])
    torch.testing.assert_close(post, pre * torch.sigmoid(pre))  # SiLU written out


def test_wd_scores_match_exact_wd_of_full_capture():
    from sparse_expansion_plugin.metrics.wasserstein import wd_exact

    pytest.importorskip("sparse_expansion_plugin.analysis.capture")
    from sparse_expansion_plugin.analysis.ablation import wd_scores

    model = make_tiny_llama()
    ids = windows(4, 32)
    scores = wd_scores(model, ids, batch_size=2)
    assert list(scores) == ablation_targets(model)
    for name, wd in scores.items():
        full = record_outputs(model, name, ids).reshape(-1, 64)
        torch.testing.assert_close(wd, wd_exact(full.double()), atol=0.02, rtol=0)


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with a character-level tokenizer (ASCII ids 3..127)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(3, 128)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama(layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_ablate_command_writes_outputs_and_refuses_existing(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("sparse_expansion_plugin.analysis.capture")
    from sparse_expansion_plugin.cli import main

    out = tmp_path / "ablation"
    argv = [
        "ablate", str(tiny_model_dir), "--output-dir", str(out), "--percents", "5", "50",
        "--calibration-windows", "4", "--eval-windows", "2", "--seq-len", "32", "--batch-size", "2",
        "--histogram-neurons", "2", "--histogram-windows", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,  # says this package wrote the directory, so --overwrite may replace it
        "ablation.csv",
        "ablation.json",
        "ablation.png",
        "histograms.png",
    ]
    data = json.loads((out / "ablation.json").read_text())
    assert len(data["rows"]) == 2 * 2 * 3
    assert math.isfinite(data["baseline_perplexity"])
    assert (out / "ablation.csv").read_text().count("\n") == 1 + 1 + 12
    assert "| clamp | 50 | 32 |" in capsys.readouterr().out
    assert main(argv) == 2  # refuses the existing directory
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--modes", "clamp", "--selections", "top"]) == 0
    assert len(json.loads((out / "ablation.json").read_text())["rows"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ablation"]  # no temporary leftovers


def test_ablate_command_rejects_bad_percent_and_layer(tiny_model_dir, tmp_path, capsys):
    from sparse_expansion_plugin.cli import main

    out = tmp_path / "x"
    assert main(["ablate", str(tiny_model_dir), "--output-dir", str(out), "--percents", "0"]) == 2
    assert "(0, 100]" in capsys.readouterr().err
    assert main(["ablate", str(tiny_model_dir), "--output-dir", str(out), "--histogram-layer", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()


# --- the real model (short) ------------------------------------------------------------------


def short_windows(tokenizer, split: str, num: int = 2, length: int = 128) -> torch.Tensor:
    """``[num, length]`` ids from the start of the bundled Python docs (tokenising all of it takes long)."""
    from sparse_expansion_plugin.data.text import bundled_text

    ids = tokenizer(bundled_text("python_docs", split)[: 40 * num * length], add_special_tokens=False)[
        "input_ids"
    ]
    return torch.tensor(ids[: num * length]).view(num, length)


@pytest.mark.slow
def test_smollm2_clamp_top_wd_neurons(smollm2):
    """On SmolLM2: gates are the targets, hooks leave other neurons bit-identical, and clamping the
    top-5% WD gate neurons of every layer (WD scored by the shared metric) raises perplexity."""
    from sparse_expansion_plugin.metrics.wasserstein import wd_to_gaussian

    model, tokenizer = smollm2
    targets = ablation_targets(model)
    assert len(targets) == 30 and targets[0].endswith("mlp.gate_proj")
    ids = short_windows(tokenizer, "calibration")
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: captured.__setitem__(n, out.reshape(-1, out.shape[-1]))
        )
        for n in targets
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    scores = {n: wd_to_gaussian(captured[n].double()) for n in targets}
    top = select_per_layer(scores, 5, "top")
    name = targets[3]
    before = captured[name]
    with ablate_neurons(model, {name: top[name]}, "clamp"):
        after = record_outputs(model, name, ids).reshape(-1, before.shape[-1])
    keep = torch.ones(before.shape[-1], dtype=torch.bool)
    keep[top[name]] = False
    assert torch.equal(after[:, keep], before[:, keep])
    assert torch.equal(after[:, ~keep], before[:, ~keep].clamp_min(0))
    evaluation = short_windows(tokenizer, "evaluation")
    base = token_perplexity(model, evaluation, 2, progress=False)
    with ablate_neurons(model, top, "clamp"):
        clamped = token_perplexity(model, evaluation, 2, progress=False)
    assert clamped > base
