"""Save -> load (our loader and transformers' remote code) gives identical logits; bad checkpoints fail clearly.

References: the in-memory model's logits, and a per-token loop over each token's expert
weights (independent of the routed forward). A directory in 0.1.0's format (format 1)
is built here by hand, from its documented layout, not by the code under test.
"""

from __future__ import annotations

import copy
import io
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
from sparse_expansion_plugin.sparse_expansion.block import expanded_blocks, install_expanded_block
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear
from sparse_expansion_plugin.sparse_expansion.model import shard_count
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def random_router(d: int, num_experts: int, gen: torch.Generator) -> ExpertRouter:
    components = torch.linalg.qr(torch.randn(d, 4, generator=gen))[0].t()
    return ExpertRouter.from_pca_kmeans(
        torch.zeros(d), components, torch.randn(num_experts, 4, generator=gen)
    )


def random_experts(weight: torch.Tensor, num_experts: int, gen: torch.Generator) -> ExpandedLinear:
    keep = torch.rand(num_experts, *weight.shape, generator=gen) > 0.5
    return weight.expand(num_experts, -1, -1) * keep, keep


def expand_randomly(model: torch.nn.Module, num_experts: int = 3, seed: int = 0, share_down: bool = False):
    """Every FFN linear -> random 50%-sparse experts; gate/up behind the block's router, down behind its own
    (or the block's, ``share_down``). No calibration needed."""
    gen = torch.Generator().manual_seed(seed)
    for block in ffn_blocks(model):
        mlp = model.get_submodule(block.parent)
        block_router = random_router(mlp.gate_proj.in_features, num_experts, gen)
        layers = {}
        for name in (*block.inputs, block.output):
            leaf = name.rsplit(".", 1)[-1]
            weight = model.get_submodule(name).weight.detach()
            experts, keep = random_experts(weight, num_experts, gen)
            own = (
                None
                if (leaf != "down_proj" or share_down)
                else random_router(weight.shape[1], num_experts, gen)
            )
            layers[leaf] = ExpandedLinear.from_experts(experts, own, keep=keep)
        install_expanded_block(model, block.parent, layers, block_router)
    return model


def per_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits with every expanded MLP computed token by token from dense expert weights (float64)."""
    reference = copy.deepcopy(model).double()

    def mlp_by_hand(mlp, args, _output):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        rows = []
        block_k = mlp.se_router.scores(flat).argmax(1)
        for t, row in enumerate(flat):
            k = int(block_k[t])
            h = torch.nn.functional.silu(mlp.gate_proj.expert_weight(k) @ row) * (
                mlp.up_proj.expert_weight(k) @ row
            )
            down = mlp.down_proj
            kd = k if down.router is None else int(down.router.scores(h[None]).argmax(1))
            rows.append(down.expert_weight(kd) @ h)
        return torch.stack(rows).reshape(*x.shape[:-1], -1)

    for block in expanded_blocks(reference).values():
        block.register_forward_hook(mlp_by_hand)
    with torch.no_grad():
        return reference(ids).logits.float()


@pytest.fixture
def expanded_tiny():
    return expand_randomly(make_tiny_llama())


def test_round_trip_both_routes_identical_logits(expanded_tiny, tmp_path):
    with torch.no_grad():
        reference = expanded_tiny(IDS).logits
    torch.testing.assert_close(reference, per_token_logits(expanded_tiny, IDS), rtol=1e-4, atol=1e-4)
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    assert is_expanded_dir(out) and not is_expanded_dir(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_sparse_expansion.")
    assert config["model_type"] == "sparse_expansion" and config["base_model_type"] == "llama"
    assert sorted(config["sparse_expansion"]["blocks"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (out / "modeling_sparse_expansion.py").is_file()
    ours = load_expanded(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert is_expanded(ours) and is_expanded(remote)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, reference)
        assert torch.equal(remote(IDS).logits, reference)
    # the remote classes must not hijack later plain Llama loads in this process
    plain = tmp_path / "plain"
    make_tiny_llama().save_pretrained(plain)
    assert not is_expanded(AutoModelForCausalLM.from_pretrained(plain))
    # experts are stored compactly: values + 1 bit per position, not K dense copies
    stored = (out / "model.safetensors").stat().st_size
    dense_experts = sum(
        3 * m.in_features * m.out_features * 4 for m in ours.modules() if isinstance(m, ExpandedLinear)
    )
    assert stored < (0.5 + 1 / 32 + 0.05) * dense_experts + sum(p.numel() * 4 for p in ours.parameters())


def test_sharded_save_reloads_identically(tmp_path):
    model = expand_randomly(make_tiny_llama(hidden=64, intermediate=128), share_down=True)
    with torch.no_grad():
        reference = model(IDS).logits
    out = save_expanded(model, None, tmp_path / "se", max_shard_size="60KB")
    assert shard_count(out) > 2 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    with torch.no_grad():
        assert torch.equal(load_expanded(out)(IDS).logits, reference)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(remote(IDS).logits, reference)


def test_plain_load_without_remote_code_refuses(expanded_tiny, tmp_path):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)


def write_format1(model: torch.nn.Module, path: Path) -> Path:
    """0.1.0's layout, by hand: routers at <mlp>.se_router_<first leaf>, a flat 'routers'/'linears' block."""
    path.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    routers, linears = {}, {}
    for parent, mlp in expanded_blocks(model).items():
        shared = f"{parent}.se_router_gate_proj"
        routers[shared] = {"in_features": mlp.se_router.in_features, "num_experts": mlp.se_router.num_experts}
        for suffix in ("weight", "bias"):
            state[f"{shared}.{suffix}"] = state.pop(f"{parent}.se_router.{suffix}")
        for leaf in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(mlp, leaf)
            router = shared
            if layer.router is not None:
                router = f"{parent}.se_router_{leaf}"
                routers[router] = {"in_features": layer.in_features, "num_experts": layer.num_experts}
                for suffix in ("weight", "bias"):
                    state[f"{router}.{suffix}"] = state.pop(f"{parent}.{leaf}.router.{suffix}")
            linears[f"{parent}.{leaf}"] = {
                "router": router,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "num_experts": layer.num_experts,
                "nnz_total": layer.values.numel(),
                "bias": layer.bias is not None,
                "reuse_routing": leaf == "down_proj" and layer.router is None,
            }
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["sparse_expansion"] = {"format_version": 1, "routers": routers, "linears": linears}
    config["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config, default=str))
    return path


@pytest.mark.parametrize("share_down", [False, True])
def test_format1_directories_still_load(tmp_path, share_down):
    model = expand_randomly(make_tiny_llama(seed=2), seed=2, share_down=share_down)
    old = write_format1(model, tmp_path / "v1")
    loaded = load_expanded(old)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, per_token_logits(model, IDS), rtol=1e-4, atol=1e-4)
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_format1_router_of_another_layer_or_flipped_reuse_is_refused(tmp_path):
    model = expand_randomly(make_tiny_llama(seed=2), seed=2)
    old = write_format1(model, tmp_path / "v1")
    config = json.loads((old / "config.json").read_text())
    linears = config["sparse_expansion"]["linears"]
    linears["model.layers.1.mlp.up_proj"]["router"] = "model.layers.0.mlp.se_router_gate_proj"
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="router .*of another module"):
        load_expanded(old)
    linears["model.layers.1.mlp.up_proj"]["router"] = "model.layers.1.mlp.se_router_gate_proj"
    linears["model.layers.0.mlp.down_proj"]["reuse_routing"] = True  # its own router then has no user
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="down_proj"):
        load_expanded(old)


def test_load_in_bfloat16_keeps_router_float32(expanded_tiny, tmp_path):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    model = load_expanded(out, dtype=torch.bfloat16)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.values.dtype == torch.bfloat16 and mlp.se_router.weight.dtype == torch.float32
    assert mlp.down_proj.router.weight.dtype == torch.float32


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
    import huggingface_hub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", broken)
    with pytest.raises(OSError, match="disk full"):
        save_expanded(expanded_tiny, None, tmp_path / "se")
    assert [p for p in tmp_path.iterdir()] == []


def corrupt(out: Path, edit) -> None:
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")


def flip_one_mask_bit(t):
    t["model.layers.0.mlp.up_proj.mask"][1, 2, 0] ^= 0b0001_0000


def swap_nnz(t):
    nnz = t["model.layers.1.mlp.gate_proj.nnz"]
    t["model.layers.1.mlp.gate_proj.nnz"] = nnz.flip(0).contiguous()
    assert not torch.equal(nnz, nnz.flip(0))


def nan_router(t):
    t["model.layers.0.mlp.se_router.weight"][0, 0] = float("nan")


def inf_values(t):
    t["model.layers.1.mlp.down_proj.values"][3] = float("inf")


def truncate_mask(t):
    t["model.layers.0.mlp.down_proj.mask"] = t["model.layers.0.mlp.down_proj.mask"][:, :-1].contiguous()


CORRUPTIONS = [
    (
        "missing expert tensor",
        lambda t: t.pop("model.layers.1.mlp.up_proj.values"),
        r"missing tensor model\.layers\.1\.mlp\.up_proj\.values",
    ),
    ("mask of the wrong shape", truncate_mask, r"down_proj\.mask has shape"),
    (
        "missing router tensor",
        lambda t: t.pop("model.layers.0.mlp.se_router.weight"),
        r"missing tensor model\.layers\.0\.mlp\.se_router\.weight",
    ),
    ("one flipped mask bit", flip_one_mask_bit, r"up_proj: the mask keeps .* but nnz says"),
    ("nnz entries swapped", swap_nnz, r"gate_proj: the mask keeps .* but nnz says"),
    ("NaN in a router weight", nan_router, r"se_router\.weight holds NaN or inf"),
    ("inf in expert values", inf_values, r"down_proj\.values holds NaN or inf"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_checkpoints_fail_clearly(expanded_tiny, tmp_path, edit, message):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    corrupt(out, edit)
    with pytest.raises(ValueError, match="corrupt Sparse Expansion checkpoint .*" + message):
        load_expanded(out)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


BAD_BLOCKS = [
    ("block is a list", lambda c: c.__setitem__("sparse_expansion", []), "must be a mapping, got list"),
    ("block is null", lambda c: c.__setitem__("sparse_expansion", None), "must be a mapping, got NoneType"),
    ("no blocks key", lambda c: c["sparse_expansion"].pop("blocks"), r"blocks: Field required"),
    (
        "a linear lacks nnz_total",
        lambda c: c["sparse_expansion"]["blocks"]["model.layers.0.mlp"]["linears"]["up_proj"].pop(
            "nnz_total"
        ),
        r"blocks\.model\.layers\.0\.mlp\.linears\.up_proj\.nnz_total: Field required",
    ),
    (
        "the block router is missing",
        lambda c: c["sparse_expansion"]["blocks"]["model.layers.1.mlp"].pop("router"),
        r"no router of their own and the block has none",
    ),
    (
        "down's own router dropped (routing flag flipped)",
        lambda c: c["sparse_expansion"]["blocks"]["model.layers.1.mlp"]["linears"]["down_proj"].__setitem__(
            "router", None
        ),
        r"unexpected \['model\.layers\.1\.mlp\.down_proj\.router",
    ),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in BAD_BLOCKS], ids=[c[0] for c in BAD_BLOCKS])
def test_bad_config_blocks_name_the_key(expanded_tiny, tmp_path, edit, message):
    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_expanded(out)


def test_forward_holds_no_activation_and_copies_cleanly(expanded_tiny):
    def saved_size(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return buffer.tell()

    before = saved_size(expanded_tiny)
    with torch.no_grad():
        expanded_tiny(torch.randint(3, 128, (8, 64)))
    assert saved_size(expanded_tiny) == before  # no routing or input kept by any module
    for module in expanded_tiny.modules():
        if isinstance(module, ExpandedLinear):
            assert module.block_routing is None
    twin = copy.deepcopy(expanded_tiny)
    with torch.no_grad():
        assert torch.equal(twin(IDS).logits, expanded_tiny(IDS).logits)


def test_a_block_routed_linear_alone_says_how_to_call_it(expanded_tiny):
    with pytest.raises(RuntimeError, match="call the MLP module"):
        expanded_tiny.model.layers[0].mlp.up_proj(torch.randn(3, 32))


def test_empty_input_and_meta_device_like_nn_linear(expanded_tiny):
    mlp = expanded_tiny.model.layers[0].mlp
    with torch.no_grad():
        empty = mlp(torch.randn(0, 32))
        assert empty.shape == (0, 32)
        assert mlp.down_proj(torch.randn(2, 0, 64)).shape == (2, 0, 32)
    meta = copy.deepcopy(expanded_tiny).to("meta")
    out = meta(torch.randint(3, 128, (2, 5), device="meta"))
    assert out.logits.shape == (2, 5, 128) and out.logits.device.type == "meta"


def test_lm_eval_hf_without_remote_code_refuses(expanded_tiny, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR` used to score random MLPs; now it must refuse."""
    from lm_eval.models.huggingface import HFLM

    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM  # noqa: F401 (ours imported too)

    out = save_expanded(expanded_tiny, None, tmp_path / "se")
    with pytest.raises(ValueError, match="trust_remote_code"):
        HFLM(pretrained=str(out), device="cpu")
