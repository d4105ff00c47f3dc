"""SparseExpansionModifier through llm-compressor's oneshot on a tiny random Llama.

References: stock ``SparseGPTModifier`` (num_experts 1 must equal it), the
definition of N:M / sparsity on each expert's keep mask, and the same model run
one sequence at a time (batching and padding must not change a token's output).
"""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, expanded_linears, is_expanded
from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

VOCAB = 128
RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("sparse_expansion_*.yaml"))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over t0..t127, built offline (oneshot insists on one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t3", pad_token="t0", bos_token="t1", eos_token="t2"
    )


def calibration(num: int = 16, length: int = 32, seed: int = 0) -> Dataset:
    ids = torch.randint(3, VOCAB, (num, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * num})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(layers=2, hidden=32, intermediate=64, vocab=VOCAB).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def compress(path: Path, recipe, num: int = 16, length: int = 32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)  # oneshot's RandomSampler shuffles calibration samples with torch's global RNG
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=calibration(num, length),
        recipe=recipe,
        num_calibration_samples=num,
        max_seq_length=length,
    )
    return model.eval()


MLP = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def expanded4(tiny_dir):
    # own down-projection routers: the path the default takes where gate/up have no common router
    return compress(
        tiny_dir, [SparseExpansionModifier(num_experts=4, sparsity=0.5, seed=0, share_router_with_down=False)]
    )


@pytest.fixture(scope="module")
def stock(tiny_dir):
    return compress(tiny_dir, [SparseGPTModifier(sparsity=0.5, targets=[r"re:.*mlp\.(gate|up|down)_proj$"])])


def test_one_expert_equals_stock_sparsegpt(tiny_dir, stock):
    ours = compress(tiny_dir, [SparseExpansionModifier(num_experts=1, sparsity=0.5)])
    for name in MLP:
        reference = stock.get_submodule(name).weight.detach()
        layer = ours.get_submodule(name)
        assert isinstance(layer, ExpandedLinear) and layer.num_experts == 1
        assert torch.equal(layer.expert_keep_mask(0), reference != 0), name
        torch.testing.assert_close(layer.expert_weight(0), reference, rtol=1e-5, atol=1e-6)
    ids = torch.tensor(calibration(2, 16, seed=5)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)


def test_every_expert_meets_its_sparsity(expanded4):
    layers = expanded_linears(expanded4)
    assert sorted(layers) == sorted(MLP)
    for name, layer in layers.items():
        assert layer.num_experts == 4
        for k in range(4):
            weight = layer.expert_weight(k)
            # the stored mask marks exactly the weights SparseGPT kept (they are non-zero after its update)
            assert torch.equal(layer.expert_keep_mask(k), weight != 0), name
            # llm-compressor's rule, counted on the weights themselves: int(numel * s) + 1 zeros per
            # 128-column block, ties aside
            zeros = int((weight == 0).sum())
            blocks = -(-layer.in_features // 128)
            assert int(weight.numel() * 0.5) <= zeros <= int(weight.numel() * 0.5) + blocks, name
    # gate and up are routed by the block's router (on the MLP input); down routes its own input
    mlp = expanded4.model.layers[0].mlp
    assert mlp.gate_proj.router is None and mlp.up_proj.router is None
    assert mlp.se_router.in_features == 32
    assert mlp.down_proj.router is not None and mlp.down_proj.router.in_features == 64


def test_experts_differ_and_routing_uses_them(expanded4):
    layer = expanded4.model.layers[1].mlp.down_proj
    assert not torch.equal(layer.expert_keep_mask(0), layer.expert_keep_mask(1))
    ids = torch.tensor(calibration(4, 32, seed=9)["input_ids"])
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(m.router(a[0]).counts))
    with torch.no_grad():
        expanded4(ids)
    handle.remove()
    assert sum(c > 0 for c in seen[0]) >= 2


def test_batched_padded_equals_one_at_a_time(expanded4):
    ids = torch.tensor(calibration(3, 20, seed=11)["input_ids"])
    lengths = [20, 13, 7]
    with torch.no_grad():
        singles = [expanded4(ids[i : i + 1, :n]).logits[0] for i, n in enumerate(lengths)]
        padded = ids.clone()
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):  # right padding
            padded[i, n:] = 0
            mask[i, :n] = 1
        batched = expanded4(input_ids=padded, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batched[i, :n], singles[i], rtol=1e-4, atol=1e-5)


def test_generate_with_kv_cache_matches_full_recompute(expanded4):
    prompt = torch.tensor(calibration(1, 6, seed=3)["input_ids"])
    with torch.no_grad():
        out = expanded4.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        nocache = expanded4.generate(
            prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert out.shape == (1, 14)
    assert torch.equal(out, nocache)


def test_same_seed_same_model_and_down_calibration_modes(tiny_dir, expanded4):
    again = compress(
        tiny_dir, [SparseExpansionModifier(num_experts=4, sparsity=0.5, seed=0, share_router_with_down=False)]
    )
    for name, layer in expanded_linears(expanded4).items():
        other = again.get_submodule(name)
        assert torch.equal(layer.values, other.values) and torch.equal(layer.mask, other.mask)
        if layer.router is not None:
            assert torch.equal(layer.router.weight, other.router.weight)
    for i in range(2):
        block, other_block = expanded4.model.layers[i].mlp, again.model.layers[i].mlp
        assert torch.equal(block.se_router.weight, other_block.se_router.weight)
    expanded = compress(
        tiny_dir,
        [SparseExpansionModifier(num_experts=4, down_calibration="expanded", share_router_with_down=False)],
    )
    first = expanded.model.layers[0].mlp
    # gate/up are fitted on the same inputs either way; down sees different (expanded) inputs
    assert torch.equal(first.gate_proj.values, expanded4.model.layers[0].mlp.gate_proj.values)
    assert not torch.equal(
        first.down_proj.router.weight, expanded4.model.layers[0].mlp.down_proj.router.weight
    )


def test_small_cluster_rules_are_applied_and_logged(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="sparse_expansion_plugin")
    merged = compress(
        tiny_dir, [SparseExpansionModifier(num_experts=8, min_cluster_tokens=100, small_cluster_rule="merge")]
    )
    assert "merged cluster of" in caplog.text
    counts = [layer.num_experts for layer in expanded_linears(merged).values()]
    assert max(counts) < 8 and min(counts) >= 1
    caplog.clear()
    compress(
        tiny_dir, [SparseExpansionModifier(num_experts=8, min_cluster_tokens=60, small_cluster_rule="global")]
    )
    assert "using the global Hessian" in caplog.text


def test_global_rule_for_every_cluster_equals_stock_weights(tiny_dir, stock):
    """An impossible minimum size sends every expert to the global Hessian: all experts are stock SparseGPT."""
    ours = compress(tiny_dir, [SparseExpansionModifier(num_experts=3, min_cluster_tokens=10**6)])
    for name in MLP:
        layer = ours.get_submodule(name)
        reference = stock.get_submodule(name).weight.detach()
        for k in range(3):
            assert torch.equal(layer.expert_keep_mask(k), reference != 0), name
            torch.testing.assert_close(layer.expert_weight(k), reference, rtol=1e-4, atol=1e-5)


def test_bad_inputs_fail_clearly(tiny_dir):
    with pytest.raises(ValueError, match="sparsity must lie in"):
        SparseExpansionModifier(sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity must lie in"):
        SparseExpansionModifier(sparsity=-0.1)
    with pytest.raises(ValueError, match="mask_structure"):
        SparseExpansionModifier(mask_structure="4:2")
    with pytest.raises(ValueError, match="exceeds the"):
        compress(tiny_dir, [SparseExpansionModifier(num_experts=40)], num=2, length=16)
    with pytest.raises(ValueError, match="'mlp.upp_proj' matched no module.*up_proj"):
        compress(tiny_dir, [SparseExpansionModifier(targets=["mlp.upp_proj"])])
    with pytest.raises(ValueError, match="leave no linear to expand"):
        compress(tiny_dir, [SparseExpansionModifier(targets=["Linear"], ignore=["re:.*"])])
    with pytest.raises(ValueError, match="prior_tokens.*hessian_shrinkage"):
        compress(tiny_dir, [SparseExpansionModifier(prior_tokens=10, hessian_shrinkage=0.5)])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipes_run(tiny_dir, recipe):
    import yaml

    text = recipe.read_text()
    stage = yaml.safe_load(text)
    modifiers = [m for s in stage.values() for group in s.values() for m in group]
    assert modifiers == ["SparseExpansionModifier"], "recipe must be nested <x>_stage: <y>_modifiers: {...}"
    # run with few experts: the tiny model has 512 calibration tokens
    small = text.replace("num_experts: 16", "num_experts: 4")
    model = compress(tiny_dir, small)
    assert is_expanded(model)
    n, m = (
        stage["sparse_expansion_stage"]["sparse_expansion_modifiers"]["SparseExpansionModifier"]
        .get("mask_structure", "0:0")
        .split(":")
    )
    if int(m):  # N:M recipes: every group of M consecutive weights of every expert keeps exactly M - N
        for layer in expanded_linears(model).values():
            for k in range(layer.num_experts):
                groups = layer.expert_keep_mask(k).reshape(layer.out_features, -1, int(m))
                assert bool((groups.sum(-1) == int(m) - int(n)).all())


def test_gpt2_conv1d_mlp_is_expanded_and_matches_its_experts(tmp_path):
    """GPT-2 stores c_fc/c_proj as Conv1D ([in, out]): experts must be [out, in] and reproduce the layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = compress(tmp_path, [SparseExpansionModifier(num_experts=3, sparsity=0.5)])
    layers = expanded_linears(model)
    assert sorted(layers) == sorted(
        f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")
    )
    fc = layers["transformer.h.0.mlp.c_fc"]
    assert (fc.in_features, fc.out_features) == (32, 64)
    proj = layers["transformer.h.0.mlp.c_proj"]
    mlp = model.transformer.h[0].mlp
    assert fc.router is None and proj.router is None  # one router per block, c_proj included (default)
    x = torch.randn(5, 32)
    routing = mlp.se_router(x)
    expected = torch.stack(
        [
            proj.expert_weight(int(k)) @ mlp.act(fc.expert_weight(int(k)) @ row + fc.bias) + proj.bias
            for row, k in zip(x, routing.assignment, strict=True)
        ]
    )
    assert len(set(routing.assignment.tolist())) > 1
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    ids = torch.tensor(calibration(1, 8, seed=2)["input_ids"])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_down_projection_shares_the_block_router_by_default_where_it_can(tiny_dir):
    shared = compress(tiny_dir, [SparseExpansionModifier(num_experts=4)])
    for layer in shared.model.layers:  # one router per block: gate, up and down all routed by it
        assert layer.mlp.se_router is not None and layer.mlp.down_proj.router is None
        assert layer.mlp.down_proj.block_routing is None  # handed over only during a call
    # gate and up with a router each: the default falls back to the down projection's own router
    separate = compress(tiny_dir, [SparseExpansionModifier(num_experts=4, share_gate_up_router=False)])
    mlp = separate.model.layers[0].mlp
    assert mlp.gate_proj.router is not None and mlp.down_proj.router is not None
    with pytest.raises(ValueError, match="share_router_with_down: true needs"):
        compress(
            tiny_dir,
            [SparseExpansionModifier(num_experts=4, share_gate_up_router=False, share_router_with_down=True)],
        )


def test_down_projection_can_share_the_mlp_router(tiny_dir, tmp_path):
    from sparse_expansion_plugin.sparse_expansion import load_expanded, save_expanded

    model = compress(tiny_dir, [SparseExpansionModifier(num_experts=4, share_router_with_down=True)])
    mlp = model.model.layers[1].mlp
    assert mlp.down_proj.router is None and mlp.gate_proj.router is None  # all three by the block
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = mlp(x)
        flat = x.reshape(-1, 32)
        ks = mlp.se_router.scores(flat).argmax(1)
        rows = []
        for row, k in zip(flat, ks.tolist(), strict=True):  # one expert per token through the whole MLP
            h = torch.nn.functional.silu(mlp.gate_proj.expert_weight(k) @ row) * (
                mlp.up_proj.expert_weight(k) @ row
            )
            rows.append(mlp.down_proj.expert_weight(k) @ h)
    assert len(set(ks.tolist())) > 1
    torch.testing.assert_close(got.reshape(-1, 32), torch.stack(rows), rtol=1e-5, atol=1e-5)
    ids = torch.tensor(calibration(2, 12, seed=4)["input_ids"])
    loaded = load_expanded(save_expanded(model, None, tmp_path / "shared"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cluster_hessians_and_shrinkage_against_direct_sums():
    from sparse_expansion_plugin.sparse_expansion.hessians import cluster_hessians, regularized_hessians

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 30, 6, generator=gen) for _ in range(4)]
    assignments = [torch.randint(0, 3, (30,), generator=gen) for _ in range(4)]
    stats = cluster_hessians(batches, assignments, 3)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    a = torch.cat(assignments)
    for k in range(3):
        xk = x[a == k]
        torch.testing.assert_close(stats.per_token(k).double(), xk.t() @ xk / len(xk), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.per_token().double(), x.t() @ x / len(x), rtol=1e-5, atol=1e-6)
    shrunk, notes = regularized_hessians(
        stats, shrinkage=0.25, min_cluster_tokens=10**6, small_cluster_rule="dampen"
    )
    assert len(notes) == 3 and all("dampening" in n for n in notes)
    xk = x[a == 1]
    mean = 0.75 * xk.t() @ xk / len(xk) + 0.25 * x.t() @ x / len(x)
    expected = mean + 0.1 * mean.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(shrunk[1].double(), expected, rtol=1e-5, atol=1e-6)


def test_single_expert_below_min_cluster_tokens_keeps_its_own_hessian():
    """With one expert the 'global' fallback is the expert's own Hessian: stock SparseGPT's, unchanged."""
    from sparse_expansion_plugin.sparse_expansion.hessians import cluster_hessians, regularized_hessians

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 16, 5, generator=gen) for _ in range(3)]
    stats = cluster_hessians(batches, [torch.zeros(32, dtype=torch.long)] * 3, 1)
    x = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    out, notes = regularized_hessians(stats, min_cluster_tokens=10**6, small_cluster_rule="global")
    assert len(notes) == 1 and "global Hessian" in notes[0]
    # llm-compressor's convention: 2 / (batch rows) * X^T X
    torch.testing.assert_close(out[0].double(), 2.0 / 6 * x.t() @ x, rtol=1e-5, atol=1e-6)


def _fed_modifier(batches, **options):
    """A modifier initialised on a tiny Llama and fed ``batches`` of layer 0's MLP input by hand."""
    from types import SimpleNamespace

    model = make_tiny_llama(layers=1)
    modifier = SparseExpansionModifier(
        num_experts=3,
        targets=[r"re:model\.layers\.0\.mlp\.(gate|up)_proj$"],
        materialize_while_calibrating=False,
        **options,
    )
    modifier.on_initialize(SimpleNamespace(model=model))
    gate = model.model.layers[0].mlp.gate_proj
    weights = {
        leaf: getattr(model.model.layers[0].mlp, leaf).weight.detach().clone()
        for leaf in ("gate_proj", "up_proj")
    }
    kept = []
    for batch in batches:
        modifier.calibrate_module(gate, (batch,), None)
        kept.append(sum(b.numel() for b in modifier._groups[0].calib.sample))
    modifier.compress_modules()
    return model, modifier, weights, kept


@pytest.mark.parametrize("input_norm,prior_tokens", [("none", 0.0), ("l2", 1024.0)])
def test_streaming_router_fit_then_route_equals_a_direct_computation(input_norm, prior_tokens):
    """Router fitted on the first `router_fit_tokens` tokens, every token routed into K Hessians as it
    streams past, each shrunk toward the layer's by the count prior: against fitting on those tokens
    by hand, summing X_k^T X_k over all tokens and applying (n_k H_k + tau H) / (n_k + tau)."""
    from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
    from sparse_expansion_plugin.sparse_expansion.clustering import fit_router, pca_components_for

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 16, 32, generator=gen) + 3 * torch.randn(32, generator=gen) for _ in range(6)]
    model, modifier, weights, kept = _fed_modifier(
        batches, router_fit_tokens=64, input_norm=input_norm, prior_tokens=prior_tokens
    )
    assert kept[:2] == [2 * 16 * 32, 0] and set(kept[2:]) == {0}  # sample dropped once the router is fitted
    sample = torch.cat([b.reshape(-1, 32) for b in batches[:2]])
    fitted = fit_router(sample, 3, pca_components_for(32, 32, None), seed=0, input_norm=input_norm)
    tokens = torch.cat([b.reshape(-1, 32) for b in batches]).double()
    assignment = fitted.router.scores(tokens.float()).argmax(1)
    mlp = model.model.layers[0].mlp
    torch.testing.assert_close(mlp.se_router.weight, fitted.router.weight)
    layer_mean = tokens.t() @ tokens / len(tokens)
    for leaf, weight in weights.items():
        layer = getattr(mlp, leaf)
        for k in range(3):
            xk = tokens[assignment == k]
            own_mean = xk.t() @ xk / len(xk)
            hessian = (len(xk) * own_mean + prior_tokens * layer_mean) / (len(xk) + prior_tokens)
            reference, keep = sparsegpt_prune(weight, hessian.float(), sparsity=0.5)
            assert torch.equal(layer.expert_keep_mask(k), keep), (leaf, k)
            torch.testing.assert_close(layer.expert_weight(k), reference, rtol=1e-4, atol=1e-5)


def test_streaming_with_a_sample_holding_every_token_equals_keeping_everything():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 24, 32, generator=gen) for _ in range(5)]
    keep_all, *_ = _fed_modifier(batches, router_fit_tokens=None)  # every input kept until the layer ends
    big_sample, *_ = _fed_modifier(batches, router_fit_tokens=10**6)
    for a, b in zip(expanded_linears(keep_all).values(), expanded_linears(big_sample).values(), strict=True):
        assert torch.equal(a.values, b.values) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize(
    "targets,ignore",
    [
        (["Linear"], ["re:.*lm_head"]),  # llm-compressor's usual spelling: every linear but lm_head
        ([r"re:.*mlp\.(gate|up|down)_proj$"], []),
        (["re:.*layers\\.1\\..*"], ["re:.*self_attn.*"]),  # a decoder layer as the target, attention ignored
    ],
)
def test_targets_and_ignore_mean_what_they_mean_for_stock_sparsegpt(tiny_dir, targets, ignore):
    """Same spellings, same modules: the linears stock SparseGPT prunes are the ones we expand."""
    stock_model = compress(tiny_dir, [SparseGPTModifier(sparsity=0.5, targets=targets, ignore=ignore)])
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    pruned = {
        name
        for name, module in stock_model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not torch.equal(module.weight, dense.get_submodule(name).weight)
    }
    ours = compress(tiny_dir, [SparseExpansionModifier(num_experts=2, targets=targets, ignore=ignore)])
    assert pruned and set(expanded_linears(ours)) == pruned


def test_disk_offloaded_compression_equals_in_memory(tiny_dir, expanded4, tmp_path):
    """Every module offloaded to disk (compressed-tensors' DiskCache), as a model too big for memory
    would be: the expanded model equals the in-memory one, and its experts and routers are attached
    offloaded too (a bare setattr would leave them resident for good)."""
    from compressed_tensors.offload import offload_module
    from compressed_tensors.offload.cache import DiskCache

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for module in model.modules():
        offload_module(module, "cpu", "disk", offload_dir=str(tmp_path))
    torch.manual_seed(0)
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=calibration(16, 32),
        recipe=[SparseExpansionModifier(num_experts=4, sparsity=0.5, seed=0, share_router_with_down=False)],
        num_calibration_samples=16,
        max_seq_length=32,
    )
    model.eval()
    layers = expanded_linears(model)
    assert sorted(layers) == sorted(MLP)
    assert all(isinstance(layer._buffers, DiskCache) for layer in layers.values())
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.se_router._buffers, DiskCache) and isinstance(
        mlp.down_proj.router._buffers, DiskCache
    )
    ids = torch.tensor(calibration(2, 16, seed=5)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expanded4(ids).logits, rtol=0, atol=0)


def test_soft_hessians_equal_a_direct_computation_with_scikit_learn_distances():
    """soft_hessian_scale: each token counted in its own cluster with 1 - s and in its second-nearest
    with s = expit(-gap / (scale x median gap)), gap = d_2^2 - d_1^2 from scikit-learn's k-means
    distances; each cluster's Hessian the weighted mean of x x^T, pulled by the prior with the weighted
    count. Against that computed by hand in float64 and stock-shaped SparseGPT per expert."""
    from scipy.special import expit

    from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
    from sparse_expansion_plugin.sparse_expansion.clustering import fit_router, pca_components_for

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 16, 32, generator=gen) + 3 * torch.randn(32, generator=gen) for _ in range(6)]
    scale, tau = 0.5, 16.0
    model, _, weights, _ = _fed_modifier(
        batches, router_fit_tokens=64, soft_hessian_scale=scale, prior_tokens=tau
    )
    sample = torch.cat([b.reshape(-1, 32) for b in batches[:2]])
    fitted = fit_router(sample, 3, pca_components_for(32, 32, None), seed=0, input_norm="l2")
    assert fitted.kmeans is not None

    def first_second_gap(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        squared = fitted.kmeans.transform(fitted.transform(x).numpy()) ** 2  # scikit-learn's distances
        order = np.argsort(squared, axis=1)
        rows = np.arange(len(x))
        return order[:, 0], order[:, 1], squared[rows, order[:, 1]] - squared[rows, order[:, 0]]

    median_gap = np.median(first_second_gap(sample)[2])
    tokens = torch.cat([b.reshape(-1, 32) for b in batches]).double()
    first, second, gap = first_second_gap(tokens.float())
    share = expit(-gap / (scale * median_gap))
    assert 0.05 < share.mean() < 0.45  # a real share of the tokens' weight moves, not a no-op
    x = tokens.numpy()
    layer_mean = x.T @ x / len(x)
    mlp = model.model.layers[0].mlp
    for leaf, weight in weights.items():
        layer = getattr(mlp, leaf)
        for k in range(3):
            w = np.where(first == k, 1 - share, 0.0) + np.where(second == k, share, 0.0)
            own_mean = (x * w[:, None]).T @ x / w.sum()
            hessian = (w.sum() * own_mean + tau * layer_mean) / (w.sum() + tau)
            reference, keep = sparsegpt_prune(weight, torch.from_numpy(hessian).float(), sparsity=0.5)
            assert torch.equal(layer.expert_keep_mask(k), keep), (leaf, k)
            torch.testing.assert_close(layer.expert_weight(k), reference, rtol=1e-4, atol=1e-5)


def test_soft_hessians_reach_the_down_projection_and_vanish_as_the_scale_shrinks(tiny_dir):
    """The down projection, routed by the gate/up routing, gets the same soft shares: a vanishing scale
    (every share 0) gives the hard model's experts in every linear, scale 1 changes every linear's."""
    hard = compress(tiny_dir, SparseExpansionModifier(num_experts=4, seed=0))
    vanishing = compress(tiny_dir, SparseExpansionModifier(num_experts=4, seed=0, soft_hessian_scale=1e-30))
    soft = compress(tiny_dir, SparseExpansionModifier(num_experts=4, seed=0, soft_hessian_scale=1.0))
    layers = [expanded_linears(m) for m in (hard, vanishing, soft)]
    assert any(name.endswith("down_proj") for name in layers[0])
    for name, hard_layer in layers[0].items():
        near, far = layers[1][name], layers[2][name]
        # every share is 0: only the Hessians' float summation order and row counts differ
        torch.testing.assert_close(near.values, hard_layer.values, rtol=1e-3, atol=1e-4)
        assert torch.equal(near.mask, hard_layer.mask), name
        assert not torch.equal(far.mask, hard_layer.mask), name


def test_soft_hessian_scale_must_be_positive():
    with pytest.raises(ValueError, match="soft_hessian_scale"):
        SparseExpansionModifier(soft_hessian_scale=0.0)


def test_release_weights_frees_an_expanded_model_whoever_still_holds_it(tiny_dir):
    """After ``oneshot`` something outside our code keeps every compressed model (llm-compressor's
    traced forward); ``release_weights`` must leave that reference holding no tensor."""
    from sparse_expansion_plugin.compression import release_weights

    model = compress(tiny_dir, [SparseExpansionModifier(num_experts=4, sparsity=0.5, seed=0)])
    experts = list(expanded_linears(model).values())
    assert experts and all(m.values.device.type == "cpu" for m in experts)
    held_elsewhere = [model]
    old_values = [weakref.ref(m.values) for m in experts]

    release_weights(model)
    gc.collect()

    tensors = list(held_elsewhere[0].parameters()) + list(held_elsewhere[0].buffers())
    assert tensors and all(t.device == torch.device("meta") for t in tensors)
    assert all(m.values.device.type == "meta" for m in experts)
    assert all(ref() is None for ref in old_values)  # no offload cache, hook or modifier kept the data
