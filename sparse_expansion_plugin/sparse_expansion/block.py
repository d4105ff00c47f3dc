"""The MLP block as Sparse Expansion's unit: one router per block, routing handed to its linears per call.

Why a pre-hook on the MLP and not a cache in the router: the MLP's forward is
where one input fans out to several linears (gate and up see the same tokens,
and the down projection may be routed by them too). Routing that input once, in
a forward pre-hook of the MLP module, and handing the result to exactly the
linears that use it makes the dependency explicit: no layer reads state another
layer left behind, and nothing outlives the call (the post-hook clears it, even
when the forward raises). Module names and the state dict are unchanged: the
router is registered as ``<mlp>.se_router``.

:func:`install_expanded_block` is the one way expanded layers get onto a model:
the modifier calls it with fitted layers, :func:`install_spec` (used by the
loader and the remote-code file) with empty ones built from a saved spec.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear
from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter
from sparse_expansion_plugin.sparse_expansion.spec import (
    BLOCK_ROUTER,
    BlockSpec,
    ExpansionSpec,
    LinearSpec,
    RouterSpec,
)

_ROUTED = "_se_block_routed"  # names (relative to the block) of the linears routed by the block router


def _hand_routing(block: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of an MLP block: route its input once and hand the routing to its linears."""
    router = getattr(block, BLOCK_ROUTER)
    if not args or not isinstance(args[0], torch.Tensor):
        raise RuntimeError(f"{type(block).__name__} was called without a tensor input to route")
    routing = router(args[0])
    for name in getattr(block, _ROUTED):
        layer = block.get_submodule(name)
        assert isinstance(layer, ExpandedLinear)
        layer.block_routing = routing


def _drop_routing(block: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
    """Forward hook (always called): the routing of this call is not kept past it."""
    for name in getattr(block, _ROUTED):
        layer = block.get_submodule(name)
        assert isinstance(layer, ExpandedLinear)
        layer.block_routing = None


def _attach(parent: nn.Module, leaf: str, module: nn.Module) -> None:
    """``parent.<leaf> = module``, offloaded like ``parent`` when it is (compressed-tensors' offload API).

    Why: under llm-compressor's sequential pipeline every module lives in an ``OffloadCache``
    (CPU or disk) and is onloaded per subgraph; a module attached with a bare ``setattr``
    would stay on the GPU for good. Its own router is attached the same way.
    """
    from compressed_tensors.offload import register_offload_module

    router = module._modules.get("router") if isinstance(module, ExpandedLinear) else None
    if router is not None:
        del module._modules["router"]
    if leaf in parent._modules:
        del parent._modules[leaf]
    register_offload_module(parent, leaf, module)
    if router is not None:
        register_offload_module(module, "router", router)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    _attach(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def install_expanded_block(
    model: nn.Module,
    block_name: str,
    linears: dict[str, ExpandedLinear],
    router: ExpertRouter | None = None,
) -> nn.Module:
    """Put ``linears`` (names relative to the block) into the block ``block_name`` of ``model``.

    ``router``: the block's router, for the linears without their own router
    (it routes the block's input). May be called again for the same block
    (e.g. the down projection after gate and up); returns the block module.
    """
    block = model.get_submodule(block_name) if block_name else model
    block_routed = [name for name, layer in linears.items() if layer.router is None]
    if block_routed and router is None and not hasattr(block, BLOCK_ROUTER):
        raise ValueError(
            f"{block_name}: {block_routed} have no router of their own and the block has none; "
            "pass the block's router"
        )
    for name, layer in linears.items():
        _set_submodule(block, name, layer)
    if router is not None:
        if BLOCK_ROUTER in block._modules:
            del block._modules[BLOCK_ROUTER]
        _attach(block, BLOCK_ROUTER, router)
    if block_routed:
        setattr(block, _ROUTED, list(dict.fromkeys([*getattr(block, _ROUTED, []), *block_routed])))
        if _hand_routing not in block._forward_pre_hooks.values():  # hooks are plain functions: deepcopy-safe
            block.register_forward_pre_hook(_hand_routing)
            block.register_forward_hook(_drop_routing, always_call=True)
    return block


def expanded_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding expanded linears (as children, or a block router), by name."""
    blocks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpandedLinear):
            parent = name.rpartition(".")[0]
            blocks[parent] = model.get_submodule(parent) if parent else model
    return blocks


def expansion_spec(model: nn.Module) -> ExpansionSpec:
    """The serialisable spec of every expanded block of ``model`` (what :func:`install_spec` rebuilds)."""
    blocks: dict[str, BlockSpec] = {}
    for block_name, block in expanded_blocks(model).items():
        router = getattr(block, BLOCK_ROUTER, None)
        routed = set(getattr(block, _ROUTED, []))
        linears: dict[str, LinearSpec] = {}
        for leaf, layer in block.named_children():
            if not isinstance(layer, ExpandedLinear):
                continue
            if layer.router is None and leaf not in routed:
                raise ValueError(f"{block_name}.{leaf} has no router and is not routed by its block")
            linears[leaf] = LinearSpec(
                in_features=layer.in_features,
                out_features=layer.out_features,
                num_experts=layer.num_experts,
                nnz_total=int(layer.values.numel()),
                bias=layer.bias is not None,
                router=RouterSpec.of(layer.router) if layer.router is not None else None,
            )
        blocks[block_name] = BlockSpec(
            router=RouterSpec.of(router) if isinstance(router, ExpertRouter) and routed else None,
            linears=linears,
        )
    return ExpansionSpec(blocks=blocks)


def install_spec(model: nn.Module, spec: ExpansionSpec, dtype: torch.dtype = torch.float32) -> None:
    """Replace the linears named by ``spec`` with empty expanded layers (filled by a state dict load)."""
    for block_name, block_spec in spec.blocks.items():
        block_router = block_spec.router.build() if block_spec.router is not None else None
        layers = {
            leaf: ExpandedLinear(
                linear.in_features,
                linear.out_features,
                linear.num_experts,
                linear.nnz_total,
                router=linear.router.build() if linear.router is not None else None,
                bias=linear.bias,
                dtype=dtype,
            )
            for leaf, linear in block_spec.linears.items()
        }
        install_expanded_block(model, block_name, layers, block_router)
