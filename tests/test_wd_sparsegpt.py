"""WassersteinSparseGPTModifier through oneshot on a tiny Llama, against stock SparseGPTModifier."""

from __future__ import annotations

import pytest
import torch
import yaml
from scipy.stats import spearmanr

from sparse_expansion_plugin.modifiers.recipes import load_recipe

IGNORE = ["re:.*lm_head"]
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A saved tiny Llama with SmolLM2's tokenizer (oneshot needs a saved model and a tokenizer)."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # A small vocabulary keeps lm_head cheap; the calibration ids below stay inside it.
    model = make_tiny_llama(seed=3, hidden=64, intermediate=128, vocab=VOCAB)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calibration(tiny_dir):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (12, 96), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 96] * 12})


def _oneshot(tiny_dir, calibration, recipe, output_dir=None):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)  # oneshot's RandomSampler shuffles the samples with torch's global RNG
    oneshot(
        model=model,
        processor=AutoTokenizer.from_pretrained(tiny_dir),
        dataset=calibration,
        recipe=recipe,
        num_calibration_samples=len(calibration),
        max_seq_length=96,
        output_dir=output_dir,
    )
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}


def _stock(tiny_dir, calibration, **kwargs):
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return _oneshot(tiny_dir, calibration, [SparseGPTModifier(targets=["Linear"], ignore=IGNORE, **kwargs)])


def _wd(tiny_dir, calibration, **kwargs):
    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    return _oneshot(
        tiny_dir, calibration, [WassersteinSparseGPTModifier(targets=["Linear"], ignore=IGNORE, **kwargs)]
    )


NEUTRAL_STRENGTH = 1e-9  # exp(1e-9 * rank) rounds to 1.0 in float32: our code path with no effect


@pytest.mark.parametrize("structure", [{"sparsity": 0.5}, {"sparsity": 0.5, "mask_structure": "2:4"}])
def test_our_code_path_at_neutral_strength_reproduces_stock(tiny_dir, calibration, structure, caplog):
    """Our statistics, scores and solver (not ``super()``) give stock SparseGPT's weights when weights are 1.

    ``wd_strength: 0`` hands over to the stock code, so comparing it with stock would compare stock
    with itself; a strength too small to change a float32 factor runs every line of ours instead.
    """
    import logging

    from sparse_expansion_plugin.wd_sparsegpt.allocation import row_saliency_weights

    assert torch.equal(row_saliency_weights(torch.randn(100), NEUTRAL_STRENGTH), torch.ones(100))
    stock = _stock(tiny_dir, calibration, **structure)
    with caplog.at_level(logging.INFO, logger="sparse_expansion_plugin.wd_sparsegpt.modifier"):
        ours = _wd(tiny_dir, calibration, wd_strength=NEUTRAL_STRENGTH, wd_token_stride=1, **structure)
    ran = [r for r in caplog.records if r.getMessage().startswith("WD-aware SparseGPT ")]
    assert len(ran) == len(stock)  # every module went through our _compress_one, none through super()
    for name in stock:
        assert torch.equal(stock[name] == 0, ours[name] == 0), name
        torch.testing.assert_close(ours[name], stock[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def stock70(tiny_dir, calibration):
    return _stock(tiny_dir, calibration, sparsity=0.7)


@pytest.fixture(scope="module")
def wd70(tiny_dir, calibration):
    return _wd(tiny_dir, calibration, sparsity=0.7, wd_strength=1.0, wd_token_stride=1)


def test_rows_keep_every_module_total_and_move_zeros(stock70, wd70):
    ours = wd70
    moved = 0
    for name, weight in stock70.items():
        assert int((ours[name] == 0).sum()) == int((weight == 0).sum()), name
        moved += int(((ours[name] == 0) != (weight == 0)).sum())
    assert moved > 0


def test_rows_follow_wd_of_dense_outputs(tiny_dir, calibration, stock70, wd70):
    """Layer 0 sees dense inputs in the sequential pipeline: rank its rows by exact WD (reference)."""
    from transformers import AutoModelForCausalLM

    from sparse_expansion_plugin.metrics.wasserstein import wd_exact

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    names = [n for n in stock70 if n.startswith("model.layers.0.")]
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: outputs[n].append(o.reshape(-1, o.shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor(calibration["input_ids"]))
    for handle in handles:
        handle.remove()
    ours = wd70
    for name in names:
        wd = wd_exact(torch.cat(outputs[name]))
        shift = (ours[name] == 0).float().mean(1) - (stock70[name] == 0).float().mean(1)
        rho = spearmanr(wd.numpy(), shift.numpy()).statistic
        assert rho < -0.3, f"{name}: row sparsity change vs WD Spearman {rho:.2f}"


@pytest.mark.parametrize("mode", ["layers", "both"])
def test_layer_allocation_keeps_the_model_total(tiny_dir, calibration, stock70, mode):
    ours = _wd(tiny_dir, calibration, sparsity=0.7, wd_strength=1.0, allocation=mode, max_layer_shift=0.1)
    total = sum(int((w == 0).sum()) for w in stock70.values())
    assert sum(int((w == 0).sum()) for w in ours.values()) == total
    per_layer = [
        sum(float((w == 0).float().mean()) for n, w in ours.items() if n.startswith(f"model.layers.{i}.")) / 7
        for i in range(2)
    ]
    assert abs(per_layer[0] - per_layer[1]) > 0.05  # layers moved (within +-max_layer_shift of 0.7)
    assert all(0.59 <= s <= 0.81 for s in per_layer)


def test_nm_stays_exact_with_wd(tiny_dir, calibration):
    stock = _stock(tiny_dir, calibration, sparsity=0.5, mask_structure="2:4")
    ours = _wd(tiny_dir, calibration, sparsity=0.5, mask_structure="2:4", wd_strength=2.0, wd_token_stride=1)
    differ = 0
    for name, weight in ours.items():
        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
        differ += int(((weight == 0) != (stock[name] == 0)).sum())
    assert differ > 0  # WD changed which weights survive inside groups


@pytest.mark.parametrize("score", ["kurtosis", "variance", "owl", "random"])
def test_control_scores_spend_the_same_zeros(tiny_dir, calibration, stock70, score):
    ours = _wd(tiny_dir, calibration, sparsity=0.7, wd_strength=1.0, score=score)
    for name, weight in stock70.items():
        assert int((ours[name] == 0).sum()) == int((weight == 0).sum()), name


def test_yaml_recipe_runs_and_saved_recipe_holds_new_fields(tiny_dir, calibration, tmp_path):
    recipe = """
    sparsity_stage:
      sparsity_modifiers:
        WassersteinSparseGPTModifier:
          sparsity: 0.6
          wd_strength: 0.75
          allocation: both
          score: wd
          max_layer_shift: 0.04
          targets: ['Linear']
          ignore: ['re:.*lm_head']
    """
    weights = _oneshot(tiny_dir, calibration, recipe, output_dir=str(tmp_path / "out"))
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    args = saved["sparsity_stage"]["sparsity_modifiers"]["WassersteinSparseGPTModifier"]
    assert (args["wd_strength"], args["allocation"], args["score"], args["max_layer_shift"]) == (
        0.75,
        "both",
        "wd",
        0.04,
    )
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert abs(zeros / sum(w.numel() for w in weights.values()) - 0.6) < 0.01


@pytest.mark.parametrize(
    ("targets", "ignore", "message"),
    [
        ([r"re:.*mlp\.upp_proj"], IGNORE, r"targets \['re:.*upp_proj'\] matched no module.*up_proj"),
        (["Embedding"], [], r"matched 1 module\(s\) but leave no Linear to prune after ignore \[\]"),
        (["Linear"], ["re:.*proj", "re:.*lm_head"], r"leave no Linear to prune after ignore \['re:\.\*proj'"),
    ],
)
def test_targets_that_prune_nothing_fail_loudly(tiny_dir, calibration, tmp_path, targets, ignore, message):
    """Upstream exits 0 and saves the model unpruned; ours stops before calibration and writes nothing."""
    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    out = tmp_path / "out"
    modifier = WassersteinSparseGPTModifier(sparsity=0.5, targets=targets, ignore=ignore)
    with pytest.raises(ValueError, match=message) as error:
        _oneshot(tiny_dir, calibration, [modifier], output_dir=str(out))
    assert "ignore: ['re:.*lm_head']" in str(error.value)  # the hint names the usual recipe
    assert not out.exists()


def test_registered_by_name_after_import():
    from llmcompressor.modifiers.factory import ModifierFactory

    import sparse_expansion_plugin

    modifier = ModifierFactory.create(
        "WassersteinSparseGPTModifier", allow_registered=True, allow_experimental=True, sparsity=0.5
    )
    assert type(modifier) is sparse_expansion_plugin.WassersteinSparseGPTModifier


RECIPE = "s_stage:\n  s_modifiers:\n    {name}:\n{fields}"


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("WassersteinSparseGPTModifier", "      sparsity: 1.0", r"\[0, 1\)"),
        ("WassersteinSparseGPTModifier", "      sparsity: -0.2", r"\[0, 1\)"),
        ("SparseGPTModifier", "      sparsity: 1.5", r"\[0, 1\)"),
        ("WassersteinSparseGPTModifier", "      sparsity: [0.5, 0.6]", "allocation: layers"),
        ("WassersteinSparseGPTModifier", "      mask_structure: '2-4'", "N:M"),
        ("WassersteinSparseGPTModifier", "      mask_structure: '0:4'", "0 < N < M"),
        ("WassersteinSparseGPTModifier", "      mask_structure: '4:2'", "0 < N < M"),
        ("WassersteinSparseGPTModifier", "      allocation: columns", "'rows', 'layers' or 'both'"),
        ("WassersteinSparseGPTModifier", "      score: entropy", "'wd'"),
        ("WassersteinSparseGPTModifier", "      wd_strenght: 1.0", "wd_strenght: unknown field.*wd_strength"),
        ("WassersteinSparseGPTModifier", "      wd_strength: -1", "greater than or equal to 0"),
        ("WassersteinSparseGPTModifier", "      sparsity_profile: owl", "allocation: layers"),
        ("SparseGPTModifer", "      sparsity: 0.5", "unknown modifier.*WassersteinSparseGPTModifier"),
    ],
)
def test_invalid_recipes_name_the_problem(name, fields, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(RECIPE.format(name=name, fields=fields))


def test_sparsity_and_mask_structure_use_the_shared_validator():
    from sparse_expansion_plugin.pruning.structure import normalized_mask_structure
    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    for spelled in (" 2 : 4", "2:4", "0:0"):
        modifier = WassersteinSparseGPTModifier(sparsity=0.5, mask_structure=spelled)
        assert modifier.mask_structure == normalized_mask_structure(spelled) == spelled.replace(" ", "")
    for bad in (True, "0.5", None):  # the shared validator's refusals reach the modifier's own construction
        with pytest.raises(ValueError, match="sparsity must be one number in"):
            WassersteinSparseGPTModifier(sparsity=bad)


@pytest.mark.parametrize(
    "text",
    [
        "WassersteinSparseGPTModifier:\n  sparsity: 0.5\n",
        "s_stage:\n  WassersteinSparseGPTModifier:\n    sparsity: 0.5\n",
        "sparsity_modifiers:\n  SparseGPTModifier:\n    sparsity: 0.5\n",
        "s_stage: {}\n",
    ],
)
def test_flat_recipes_that_would_do_nothing_are_refused(text):
    from llmcompressor.recipe import Recipe

    if "_stage" not in text:  # confirm the premise: llm-compressor itself yields no modifiers
        assert Recipe.create_instance(text).modifiers == []
    with pytest.raises(ValueError, match="_modifiers"):
        load_recipe(text)


def test_centered_ranks_match_scipy_rankdata():
    from scipy.stats import rankdata

    from sparse_expansion_plugin.wd_sparsegpt.allocation import centered_ranks, row_saliency_weights

    scores = torch.randn(57, generator=torch.Generator().manual_seed(0))
    expected = (rankdata(scores.numpy()) - 1) / 56 * 2 - 1
    torch.testing.assert_close(centered_ranks(scores), torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(row_saliency_weights(scores, 0.0), torch.ones(57))


def test_owl_layer_rule_matches_llm_compressor(monkeypatch):
    """The OWL layer ratios and sparsities the pre-pass computes equal llm-compressor's own.

    llm-compressor's ``sparsity_profile: owl`` is broken end to end, but its formula runs alone.
    ``owl_layer_outlier_ratio`` is what ``_layer_sparsities_from_prepass`` calls, fed module by module.
    """
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.wd_sparsegpt.allocation import owl_layer_outlier_ratio, owl_layer_sparsities

    torch.manual_seed(0)
    layers = {
        f"layer{i}": torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 32)) for i in range(4)
    }
    norms = {
        f"{name}.{j}": torch.rand(layer[j].in_features) ** (3 + i)
        for i, (name, layer) in enumerate(layers.items())
        for j in range(2)
    }
    stock = SparseGPTModifier(sparsity=0.7, sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    monkeypatch.setattr(stock, "_get_activations", lambda model, dataloader: norms)
    expected = stock._infer_owl_layer_sparsity(None, layers, None)
    ratios = {
        name: owl_layer_outlier_ratio([(layer[j].weight, norms[f"{name}.{j}"] ** 2) for j in range(2)], 5.0)
        for name, layer in layers.items()
    }
    assert len(set(ratios.values())) == len(layers)  # the layers differ, so the rule has work to do
    ours = owl_layer_sparsities(ratios, 0.7, 0.08)
    for name in layers:
        assert ours[name] == pytest.approx(float(expected[name]), abs=1e-9)


def test_owl_row_and_column_shares_count_against_the_whole_module_mean():
    """Per-row / per-column OWL scores (the ``score: owl`` control) against a slow loop over weights."""
    from sparse_expansion_plugin.wd_sparsegpt.allocation import owl_outlier_scores, owl_outlier_share

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 9, generator=generator) ** 3
    sq_sum = torch.rand(9, generator=generator) * 10
    mean = sum(abs(float(weight[i, j])) * float(sq_sum[j]) ** 0.5 for i in range(6) for j in range(9)) / 54
    above = [
        [abs(float(weight[i, j])) * float(sq_sum[j]) ** 0.5 > 2.0 * mean for j in range(9)] for i in range(6)
    ]
    scores = owl_outlier_scores(weight, sq_sum)
    rows = owl_outlier_share(scores, 2.0, dim=1)
    columns = owl_outlier_share(scores, 2.0, dim=0)
    torch.testing.assert_close(rows, torch.tensor([sum(r) / 9 for r in above]))
    torch.testing.assert_close(columns, torch.tensor([sum(r[j] for r in above) / 6 for j in range(9)]))
    assert 0 < float(owl_outlier_share(scores, 2.0)) < 1


def test_exact_zero_budgets_hit_the_total_and_stay_close():
    from sparse_expansion_plugin.wd_sparsegpt.allocation import exact_zero_budgets

    sizes = [1000, 3000, 500, 2500]
    fractions = [0.65, 0.75, 0.7, 0.71]
    assert exact_zero_budgets(sizes, fractions, 7000) == sizes  # everything: capped at each size
    for total in (0, 1, 4899, 4900, 6000):
        budgets = exact_zero_budgets(sizes, fractions, total)
        assert sum(budgets) == total
        assert all(0 <= b <= s for b, s in zip(budgets, sizes, strict=True))
        scale = total / sum(f * s for f, s in zip(fractions, sizes, strict=True))
        assert all(abs(b - f * s * scale) <= 1 for b, f, s in zip(budgets, fractions, sizes, strict=True))
    with pytest.raises(ValueError, match="must lie in"):
        exact_zero_budgets(sizes, fractions, 7001)


@pytest.mark.parametrize(("rows", "columns", "sparsity"), [(48, 300, 0.5), (32, 256, 0.7), (5, 70, 0.6)])
def test_stock_zero_count_matches_sparsify_weight(rows, columns, sparsity):
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    from sparse_expansion_plugin.wd_sparsegpt.allocation import stock_zero_count

    torch.manual_seed(rows)
    linear = torch.nn.Linear(columns, rows)
    x = torch.randn(256, columns)
    _, pruned = sparsify_weight(linear, {linear: 2 / 256 * x.T @ x}, sparsity, 0, 0, 128, 0.01, False)
    assert int((pruned == 0).sum()) == stock_zero_count(rows, columns, sparsity, 128)


@pytest.mark.parametrize("score", ["wd", "kurtosis", "variance"])
def test_score_statistics_keep_every_strided_token_with_a_rotating_offset(score):
    """Three calls of 10 tokens at stride 3 keep rows 0,3,6,9 / 1,4,7 / 2,5,8: checked with scipy / wd_exact."""
    from scipy.stats import kurtosis

    from sparse_expansion_plugin.metrics.wasserstein import wd_exact
    from sparse_expansion_plugin.wd_sparsegpt.statistics import ScoreStatistics

    generator = torch.Generator().manual_seed(2)
    calls = [torch.randn(2, 5, 4, generator=generator).double() ** 3 for _ in range(3)]
    stats = ScoreStatistics(score, stride=3, num_bins=1024)
    for values in calls:
        stats.update("m", values)
    kept = torch.cat([v.reshape(-1, 4)[i % 3 :: 3] for i, v in enumerate(calls)])
    assert kept.shape == (10, 4)
    result = stats.pop("m", "model.m")
    if score == "wd":
        torch.testing.assert_close(result, wd_exact(kept).float(), atol=0.02, rtol=0)
    elif score == "kurtosis":
        torch.testing.assert_close(result, torch.tensor(kurtosis(kept.numpy(), axis=0)).float())
    else:
        torch.testing.assert_close(result, kept.var(dim=0, unbiased=False).float())
    with pytest.raises(RuntimeError, match="no calibration statistics were collected for model.m"):
        stats.pop("m", "model.m")


# --------------------------------------------------------------------------- offloaded models


def _oneshot_disk_offloaded(tiny_dir, calibration, offload_dir, **kwargs):
    """oneshot on a model whose every module lives in compressed-tensors' DiskCache (execution on CPU),
    as a model too big for memory would; returns (model, {name: pruned weight as stored on disk})."""
    from compressed_tensors.offload import offload_module
    from compressed_tensors.offload.cache import DiskCache
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for module in model.modules():
        offload_module(module, "cpu", "disk", offload_dir=str(offload_dir))
    torch.manual_seed(0)  # the same sample order as _oneshot's
    oneshot(
        model=model,
        processor=AutoTokenizer.from_pretrained(tiny_dir),
        dataset=calibration,
        recipe=[WassersteinSparseGPTModifier(targets=["Linear"], ignore=IGNORE, **kwargs)],
        num_calibration_samples=len(calibration),
        max_seq_length=96,
    )
    stored = {}
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            cache = module._parameters
            assert isinstance(cache, DiskCache), f"{name} is no longer offloaded"
            # Read the tensor back from its safetensors file (what a later onload sees), not a cached copy.
            stored[name] = cache.onload(cache.offloaded_values["weight"]).clone()
    return model.eval(), stored


def test_disk_offloaded_compression_equals_in_memory(tiny_dir, calibration, wd70, tmp_path):
    """Every module offloaded to disk: the pruned weights written back to the offload files equal the
    in-memory run's bit for bit, and so do the logits (a bare ``.data =`` on an onloaded copy is lost)."""
    from transformers import AutoModelForCausalLM

    model, stored = _oneshot_disk_offloaded(
        tiny_dir, calibration, tmp_path, sparsity=0.7, wd_strength=1.0, wd_token_stride=1
    )
    assert sorted(stored) == sorted(wd70)
    for name, weight in wd70.items():
        assert torch.equal(stored[name], weight), name
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for name, weight in wd70.items():
        reference.get_submodule(name).weight.data.copy_(weight)
    ids = torch.tensor(calibration["input_ids"][:2])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "fields",
    [
        # layer budgets from a dense pre-pass that reads the offloaded weights, and row weights
        {"sparsity": 0.7, "wd_strength": 1.0, "allocation": "both", "score": "owl", "max_layer_shift": 0.1},
        {"sparsity": 0.5, "wd_strength": 2.0, "mask_structure": "2:4"},  # column weights (N:M)
    ],
)
def test_disk_offloaded_allocations_equal_in_memory(tiny_dir, calibration, tmp_path, fields):
    in_memory = _wd(tiny_dir, calibration, **fields)
    _, stored = _oneshot_disk_offloaded(tiny_dir, calibration, tmp_path, **fields)
    for name, weight in in_memory.items():
        assert torch.equal(stored[name], weight), name
