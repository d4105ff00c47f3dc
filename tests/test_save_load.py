"""Save -> load (our loader and transformers' remote code) gives identical logits; bad checkpoints fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sparse_expansion_plugin.modeling.targets import ffn_blocks
from sparse_expansion_plugin.sparse_expansion import (
    is_expanded,
    is_expanded_dir,
    load_expanded,
    save_expanded,
)
from sparse_expansion_plugin.sparse_expansion import model as save_load_module
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, replace_module
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter


def expand_randomly(model: torch.nn.Module, num_experts: int = 3, seed: int = 0) -> torch.nn.Module:
    """Replace every FFN linear by random 50%-sparse experts behind random routers (no calibration needed)."""
    gen = torch.Generator().manual_seed(seed)
    for block in ffn_blocks(model):
        for names in ([*block.inputs], [block.output]):
            first = model.get_submodule(names[0])
            d = first.in_features
            components = torch.linalg.qr(torch.randn(d, 4, generator=gen))[0].t()
            router = ExpertRouter.from_pca_kmeans(
                torch.zeros(d), components, torch.randn(num_experts, 4, generator=gen)
            )
            for name in names:
                weight = model.get_submodule(name).weight.detach()
                keep = torch.rand(num_experts, *weight.shape, generator=gen) > 0.5
                experts = weight.expand(num_experts, -1, -1) * keep
                replace_module(model, name, ExpandedLinear.from_experts(experts, router, keep=keep))
            leaf = names[0].rsplit(".", 1)[-1]
            replace_module(model, f"{block.parent}.se_router_{leaf}", router)
    return model


@pytest.fixture
def expanded_tiny():
    return expand_randomly(make_tiny_llama())


def test_round_trip_both_routes_identical_logits(expanded_tiny, tmp_path):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = expanded_tiny(ids).logits
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    assert is_expanded_dir(out) and not is_expanded_dir(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_sparse_expansion.")
    assert len(config["sparse_expansion"]["linears"]) == 6
    assert (out / "modeling_sparse_expansion.py").is_file()
    ours = load_expanded(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert is_expanded(ours) and is_expanded(remote)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference)
        assert torch.equal(remote(ids).logits, reference)
    # the remote shim must not hijack later plain Llama loads in this process
    plain = tmp_path / "plain"
    make_tiny_llama().save_pretrained(plain)
    assert not is_expanded(AutoModelForCausalLM.from_pretrained(plain))
    # experts are stored compactly: values + 1 bit per position, not K dense copies
    stored = (out / "model.safetensors").stat().st_size
    dense_experts = sum(
        3 * m.in_features * m.out_features * 4 for m in ours.modules() if isinstance(m, ExpandedLinear)
    )
    assert stored < (0.5 + 1 / 32 + 0.05) * dense_experts + sum(p.numel() * 4 for p in ours.parameters())


def test_load_in_bfloat16_keeps_router_float32(expanded_tiny, tmp_path):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    model = load_expanded(out, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.values.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32


def test_refuses_overwrite_and_non_expanded(expanded_tiny, tmp_path):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_expanded(expanded_tiny, None, out)
    save_expanded(expanded_tiny, None, out, overwrite=True)
    with pytest.raises(ValueError, match="no ExpandedLinear"):
        save_expanded(make_tiny_llama(), None, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    with pytest.raises(ValueError, match="not a Sparse Expansion model"):
        make_tiny_llama().save_pretrained(tmp_path / "plain")
        load_expanded(tmp_path / "plain")


def test_failed_save_leaves_nothing_half_written(expanded_tiny, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_load_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_expanded(expanded_tiny, None, tmp_path / "se")
    assert list(tmp_path.iterdir()) == []


def corrupt(out: Path, edit) -> None:
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")


def test_corrupt_checkpoints_fail_clearly(expanded_tiny, tmp_path):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    corrupt(out, lambda t: t.pop("model.layers.1.mlp.up_proj.values"))
    with pytest.raises(
        ValueError, match=r"corrupt .*missing expert tensor model\.layers\.1\.mlp\.up_proj\.values"
    ):
        load_expanded(out)
    out = save_expanded(expanded_tiny, None, tmp_path / "se2")

    def reshape_mask(t):
        t["model.layers.0.mlp.down_proj.mask"] = t["model.layers.0.mlp.down_proj.mask"][:, :-1].contiguous()

    corrupt(out, reshape_mask)
    with pytest.raises(ValueError, match=r"down_proj\.mask has shape"):
        load_expanded(out)
    out = save_expanded(expanded_tiny, None, tmp_path / "se3")
    corrupt(out, lambda t: t.pop("model.layers.0.mlp.se_router_gate_proj.weight"))
    with pytest.raises(ValueError, match="missing router tensor"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
