"""Hook-based statistics and the analyze report, checked against independent computations."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats as st
import torch
from transformers import AutoTokenizer

from sparse_expansion_plugin.analysis.analyze import AnalysisConfig, analyze_model
from sparse_expansion_plugin.analysis.capture import capture_activations, collect_neuron_statistics
from sparse_expansion_plugin.metrics import sample_token_pairs, wd_exact
from sparse_expansion_plugin.modeling.targets import ffn_blocks, select_linears
from sparse_expansion_plugin.outputs import MARKER
from tests.conftest import make_tiny_llama


def _biased_tiny_llama():
    return make_tiny_llama(intermediate=48, mlp_bias=True)


def _mlp_inputs(model, windows):
    """Inputs of each layer's MLP, captured with a pre-hook on the MLP block (not on the linears)."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def pre_hook(module, args, i=i):
            seen.setdefault(i, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(layer.mlp.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        for start in range(0, len(windows), 3):
            model(input_ids=windows[start : start + 3])
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def test_hook_outputs_equal_affine_map_of_inputs():
    model = _biased_tiny_llama()
    windows = torch.randint(0, 128, (7, 16), generator=torch.Generator().manual_seed(1))
    names = select_linears(model)
    captured = capture_activations(model, windows, names, batch_size=3)
    mlp_inputs = _mlp_inputs(model, windows)
    for block in ffn_blocks(model):
        x = mlp_inputs[block.layer_index]
        for name in block.inputs:
            linear = model.get_submodule(name)
            expected = x @ linear.weight.T + linear.bias
            torch.testing.assert_close(captured[name][0], x)
            torch.testing.assert_close(captured[name][1], expected, rtol=1e-5, atol=1e-5)


def test_streaming_statistics_match_exact_computation():
    model = _biased_tiny_llama()
    windows = torch.randint(0, 128, (20, 32), generator=torch.Generator().manual_seed(2))
    names = select_linears(model)
    stats = collect_neuron_statistics(
        model, windows, names, batch_size=6, num_pairs=100, seed=5, progress=False
    )
    mlp_inputs = _mlp_inputs(model, windows)
    pairs = sample_token_pairs(windows.numel(), 100, seed=5).numpy()
    for block in ffn_blocks(model):
        x = mlp_inputs[block.layer_index].double()
        for name in block.inputs:
            linear = model.get_submodule(name)
            y = (x @ linear.weight.double().T + linear.bias.double()).detach()
            s = stats[name]
            assert s.tokens == windows.numel()
            gap = (s.wd - wd_exact(y)).abs()
            assert (gap <= s.wd_error_bound + 1e-6).all()
            np.testing.assert_allclose(s.skewness.numpy(), st.skew(y.numpy(), axis=0), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(
                s.excess_kurtosis.numpy(), st.kurtosis(y.numpy(), axis=0), rtol=1e-3, atol=1e-4
            )
            # Mapping difficulty by the papers' definition, as a slow loop over the same pairs.
            xn, yn = x.numpy(), y.numpy()
            dx = np.linalg.norm(xn[pairs[:, 0]] - xn[pairs[:, 1]], axis=1)
            dy = np.abs(yn[pairs[:, 0]] - yn[pairs[:, 1]])
            md = np.mean((dy / np.median(dy, axis=0)) / (dx / dx.max())[:, None], axis=0)
            np.testing.assert_allclose(s.mapping_difficulty.numpy(), md, rtol=1e-4)


def test_non_finite_activations_name_the_layer():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("inf")
    windows = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj produced NaN or inf"):
        collect_neuron_statistics(model, windows, select_linears(model), num_pairs=2, progress=False)


def test_unknown_pattern_lists_candidates_and_no_ffn_model_is_refused():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="'mlp.upp' matched no module; candidates: .*up_proj"):
        select_linears(model, ["mlp.upp"])
    no_ffn = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no feed-forward projections"):
        select_linears(no_ffn)


NAME_CASES = [
    # (pattern, expected names among the tiny Llama's linears), written out by hand as the reference
    ("model.layers.1.mlp.up_proj", ["model.layers.1.mlp.up_proj"]),
    ("up_proj", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]),
    ("1.mlp.up_proj", ["model.layers.1.mlp.up_proj"]),
    ("p_proj", []),  # a suffix ends at a dot
    ("mlp", []),  # a parent is not a linear
    (r"re:layers\.0\..*(gate|down)", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]),
    ("re:lm_head$", ["lm_head"]),
]


@pytest.mark.parametrize(("pattern", "expected"), NAME_CASES)
def test_one_name_matcher_for_layers_and_plot_layer(pattern, expected):
    from sparse_expansion_plugin.analysis.analyze import _resolve_plot_layer
    from sparse_expansion_plugin.modeling.targets import linear_names

    model = make_tiny_llama()
    names = linear_names(model)
    if not expected:
        with pytest.raises(ValueError, match=f"{pattern!r} matched no module; candidates: .*up_proj"):
            select_linears(model, [pattern])
        with pytest.raises(ValueError, match=f"plot layer {pattern!r} matched no module"):
            _resolve_plot_layer(names, pattern)
        return
    assert select_linears(model, [pattern]) == sorted(expected, key=names.index)
    assert _resolve_plot_layer(names, pattern) == sorted(expected, key=names.index)[0]


def test_bad_regex_names_the_option():
    with pytest.raises(ValueError, match=r"plot layer 're:\(' is not a valid regex"):
        from sparse_expansion_plugin.analysis.analyze import _resolve_plot_layer

        _resolve_plot_layer(["a.b"], "re:(")


def test_too_few_tokens_for_pairs():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="need 200 distinct tokens"):
        collect_neuron_statistics(model, torch.randint(0, 128, (2, 8)), select_linears(model), num_pairs=100)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from sparse_expansion_plugin.data import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def test_analyze_report_is_written_atomically(tmp_path, smol_tokenizer, monkeypatch):
    model = make_tiny_llama(vocab=len(smol_tokenizer))
    out = tmp_path / "report"
    config = AnalysisConfig(num_windows=4, seq_len=64, num_pairs=50, top=4)
    analyze_model(model, smol_tokenizer, out, config)
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        MARKER,  # says this package wrote the directory, so --overwrite may replace it
        "neurons.csv",
        "summary.csv",
        "summary.json",
        "top_neurons.json",
        "top_neurons.png",
        "wd_by_layer.png",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["layer"] for row in summary["layers"]] == select_linears(model)
    assert len((out / "neurons.csv").read_text().splitlines()) == 1 + 4 * 64
    # An existing report is refused without overwrite, and kept intact.
    before = (out / "summary.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        analyze_model(model, smol_tokenizer, out, config)
    # A failure half-way through an overwrite leaves the old report as it was.
    import sparse_expansion_plugin.analysis.analyze as analyze_module

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(analyze_module, "plot_top_neurons", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        analyze_model(model, smol_tokenizer, out, config, overwrite=True)
    assert (out / "summary.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_analyze_cli_on_real_smollm2(tmp_path, smollm2_dir):
    out = tmp_path / "smol"
    cmd = [
        sys.executable,
        "-m",
        "sparse_expansion_plugin.cli",
        "analyze",
        str(smollm2_dir),
        "--output",
        str(out),
        "--windows",
        "6",
        "--seq-len",
        "512",
        "--pairs",
        "1000",
        "--plot-layer",
        "0",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    layers = summary["layers"]
    assert len(layers) == 60 and summary["meta"]["tokens"] == 3072
    # Wasserstein neurons are real on SmolLM2: far above a Gaussian sample's WD at this token count.
    from sparse_expansion_plugin.analysis.analyze import gaussian_reference_wd

    floor = max(gaussian_reference_wd(3072, seed) for seed in range(5))
    assert max(row["max_wd"] for row in layers) > 10 * floor
    assert all(row["max_wd_error_bound"] < 0.05 for row in layers)
    # A second run into the same directory is refused with a clear message.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
