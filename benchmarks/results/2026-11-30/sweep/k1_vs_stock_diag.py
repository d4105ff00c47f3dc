"""Diagnostic: SE K=1 vs stock SparseGPT on the real model, first N layers: where do masks differ?"""
import sys, torch
sys.path.insert(0, "/work/main/benchmarks")
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from sparse_expansion_plugin.compression import run_oneshot
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier
from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears
from sparse_expansion_quality import seeded_calibration, MLP_TARGETS

LAYERS, N = int(sys.argv[1]), int(sys.argv[2])
def load():
    m, t = load_model_and_tokenizer(None)
    m.model.layers = m.model.layers[:LAYERS]; m.config.num_hidden_layers = LAYERS
    return m, t
m, tok = load()
cal = seeded_calibration(tok, N, 512, 0, "random")
run_oneshot(m, tok, [SparseGPTModifier(sparsity=0.5, targets=MLP_TARGETS)], N, 512, 0, dataset=cal)
s, _ = load()
run_oneshot(s, tok, [SparseExpansionModifier(num_experts=1, sparsity=0.5, seed=0)], N, 512, 0, dataset=cal)
for name, layer in expanded_linears(s).items():
    ref = m.get_submodule(name).weight.detach()
    mask = layer.expert_keep_mask(0)
    w = layer.expert_weight(0)
    print(f"{name}: mask mismatches {int((mask != (ref != 0)).sum())} of {mask.numel()}, "
          f"max |dw| {float((w - ref).abs().max()):.2e}")
