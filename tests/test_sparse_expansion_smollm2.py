"""Sparse Expansion on the real SmolLM2, cut to its first two decoder layers (slow: real weights and text)."""

from __future__ import annotations

import math

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_expansion_plugin.data.calibration import calibration_dataset
from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
from sparse_expansion_plugin.sparse_expansion import is_expanded, load_expanded, save_expanded
from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
from sparse_expansion_plugin.sparse_expansion.model import shard_count
from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_layer_dir(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2_2layers")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=2, dtype=torch.float32)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path


def compressed(path, modifier):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calibration_dataset(tokenizer, 8, 128),
        recipe=[modifier],
        num_calibration_samples=8,
        max_seq_length=128,
    )
    return model.eval(), tokenizer


def test_smollm2_two_layers_expand_evaluate_save_load(two_layer_dir, tmp_path):
    stock, tokenizer = compressed(
        two_layer_dir, SparseGPTModifier(sparsity=0.5, targets=[r"re:.*mlp\.(gate|up|down)_proj$"])
    )
    expanded, _ = compressed(
        two_layer_dir, SparseExpansionModifier(num_experts=4, sparsity=0.5, min_cluster_tokens=32)
    )
    assert is_expanded(expanded)
    windows = token_windows(tokenizer, "evaluation", 128, 4)
    ppl_stock = token_perplexity(stock, windows, progress=False)
    ppl_se = token_perplexity(expanded, windows, progress=False)
    assert math.isfinite(ppl_se) and ppl_se < 1.5 * ppl_stock  # a sane model, not a quality claim
    cost = expansion_cost(expanded)
    assert cost.num_experts_mean == 4
    assert 4 * 0.5 * cost.dense_bytes < cost.expanded_bytes < 4 * 0.6 * cost.dense_bytes
    # a sharded save (as save_pretrained's max_shard_size) reloads bit for bit, by both routes
    out = save_expanded(expanded, tokenizer, tmp_path / "se4", max_shard_size="20MB")
    assert shard_count(out) > 1
    with torch.no_grad():
        reference = expanded(windows[:2]).logits
        assert torch.equal(load_expanded(out)(windows[:2]).logits, reference)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(remote(windows[:2]).logits, reference)
