"""modeling.targets on GPT-2, whose linears are transformers' Conv1D (weight stored ``[in, out]``)."""

from __future__ import annotations

import pytest
import torch


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=48, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def test_conv1d_is_recognised_by_class_and_its_weight_read_as_out_in():
    from sparse_expansion_plugin.modeling.targets import ffn_blocks, is_conv1d, linear_names, weight_as_out_in

    model = _tiny_gpt2()
    c_fc = model.transformer.h[1].mlp.c_fc
    assert is_conv1d(c_fc) and not is_conv1d(model.lm_head)
    # The module's own forward is the reference: y = x W^T + b with W read as [out, in].
    x = torch.randn(5, 32)
    weight = weight_as_out_in(c_fc)
    assert weight.shape == (48, 32)
    torch.testing.assert_close(x @ weight.T + c_fc.bias, c_fc(x))
    assert weight_as_out_in(model.lm_head) is model.lm_head.weight  # a Linear is already [out, in]
    assert "transformer.h.0.attn.c_attn" in linear_names(model)
    assert [b.inputs for b in ffn_blocks(model)] == [
        ("transformer.h.0.mlp.c_fc",),
        ("transformer.h.1.mlp.c_fc",),
    ]


def test_a_look_alike_class_named_conv1d_is_not_taken_for_one():
    from sparse_expansion_plugin.modeling.targets import is_conv1d

    class Conv1D(torch.nn.Module):  # same name, not transformers' class: not a linear
        weight = torch.zeros(3, 2)

    assert not is_conv1d(Conv1D())


def test_ablation_checks_neuron_indices_against_conv1d_outputs():
    from sparse_expansion_plugin.analysis.ablation import ablate_neurons

    model = _tiny_gpt2()
    name = "transformer.h.0.mlp.c_fc"
    with ablate_neurons(model, {name: torch.tensor([47])}):
        pass
    with (
        pytest.raises(ValueError, match="out of range .* with 48 outputs"),
        ablate_neurons(model, {name: torch.tensor([48])}),
    ):
        pass
