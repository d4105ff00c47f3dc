"""The saved description of an expanded model: which MLP blocks hold which expert layers and routers.

Written into ``config.json`` as the ``sparse_expansion`` block and validated
with pydantic on load, so a missing key, a wrong type or an inconsistent shape
is an error that names the key, not a ``KeyError`` deep in the loader.

Format 2 (this package since 0.2): ``blocks`` keyed by MLP module name; each
block has an optional ``router`` (routes the block's input, shared by the
linears without a router of their own) and ``linears`` keyed by child name.
Format 1 (0.1.0) is converted by :func:`spec_from_v1`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparse_expansion_plugin.sparse_expansion.router import INPUT_NORMS, ExpertRouter

FORMAT_VERSION = 2
BLOCK_ROUTER = "se_router"
"""Attribute (and state-dict prefix) of a block's router: ``<mlp>.se_router.weight``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSpec(_Strict):
    """A router's shape: ``weight [num_experts, in_features]``, ``bias [num_experts]``."""

    in_features: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    input_norm: str = "none"

    @model_validator(mode="after")
    def _known_norm(self) -> RouterSpec:
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        return self

    @classmethod
    def of(cls, router: ExpertRouter) -> RouterSpec:
        return cls(
            in_features=router.in_features, num_experts=router.num_experts, input_norm=router.input_norm
        )

    def build(self) -> ExpertRouter:
        return ExpertRouter(self.in_features, self.num_experts, input_norm=self.input_norm)


class LinearSpec(_Strict):
    """One expanded linear: shapes, packed size, and its own router (None: routed by its block)."""

    in_features: int = Field(ge=1)
    out_features: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    nnz_total: int = Field(ge=0)
    bias: bool
    router: RouterSpec | None = None

    @model_validator(mode="after")
    def _router_fits(self) -> LinearSpec:
        if self.router is not None and (
            self.router.in_features != self.in_features or self.router.num_experts != self.num_experts
        ):
            raise ValueError(
                f"own router routes {self.router.in_features}-d inputs to {self.router.num_experts} experts, "
                f"but the linear has {self.in_features} inputs and {self.num_experts} experts"
            )
        if self.nnz_total > self.num_experts * self.in_features * self.out_features:
            raise ValueError(f"nnz_total {self.nnz_total} exceeds num_experts * in * out")
        return self


class BlockSpec(_Strict):
    """One MLP block: its router (for linears without their own) and its expanded linears."""

    router: RouterSpec | None = None
    linears: dict[str, LinearSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _routers_consistent(self) -> BlockSpec:
        block_routed = [name for name, linear in self.linears.items() if linear.router is None]
        if block_routed and self.router is None:
            raise ValueError(f"linears {block_routed} have no router of their own and the block has none")
        if self.router is not None and not block_routed:
            raise ValueError("the block has a router but every linear routes its own input")
        if self.router is not None:
            for name in block_routed:
                if self.linears[name].num_experts != self.router.num_experts:
                    raise ValueError(
                        f"linear {name} has {self.linears[name].num_experts} experts, "
                        f"the block router routes to {self.router.num_experts}"
                    )
            if not any(self.linears[n].in_features == self.router.in_features for n in block_routed):
                raise ValueError(
                    f"the block router takes {self.router.in_features}-d inputs, but no linear it routes "
                    "reads an input of that size"
                )
        return self


class ExpansionSpec(_Strict):
    """Every expanded block of a model, by module name (the ``sparse_expansion`` config block)."""

    format_version: Literal[2] = 2  # FORMAT_VERSION
    blocks: dict[str, BlockSpec] = Field(min_length=1)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict name -> shape of every tensor this spec implies (routers and packed experts)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for block_name, block in self.blocks.items():
            prefix = f"{block_name}." if block_name else ""
            if block.router is not None:
                shapes[f"{prefix}{BLOCK_ROUTER}.weight"] = (
                    block.router.num_experts,
                    block.router.in_features,
                )
                shapes[f"{prefix}{BLOCK_ROUTER}.bias"] = (block.router.num_experts,)
            for leaf, linear in block.linears.items():
                name = f"{prefix}{leaf}"
                shapes[f"{name}.values"] = (linear.nnz_total,)
                shapes[f"{name}.mask"] = (
                    linear.num_experts,
                    linear.out_features,
                    (linear.in_features + 7) // 8,
                )
                shapes[f"{name}.nnz"] = (linear.num_experts,)
                if linear.bias:
                    shapes[f"{name}.bias"] = (linear.out_features,)
                if linear.router is not None:
                    shapes[f"{name}.router.weight"] = (linear.num_experts, linear.in_features)
                    shapes[f"{name}.router.bias"] = (linear.num_experts,)
        return shapes


def parse_spec(block: Any, where: str) -> ExpansionSpec:
    """Validate a ``sparse_expansion`` config block (format 2); errors name the key and the file."""
    if not isinstance(block, dict):
        raise ValueError(
            f"{where}: the 'sparse_expansion' block must be a mapping, got {type(block).__name__}; "
            "the directory was not written by save_expanded or was edited"
        )
    try:
        return ExpansionSpec.model_validate(block)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(block)'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise ValueError(f"{where}: invalid 'sparse_expansion' block in config.json: {problems}") from None


def spec_from_v1(block: dict[str, Any], where: str) -> tuple[ExpansionSpec, dict[str, str]]:
    """Convert a format-1 block (0.1.0) to a spec plus the tensor renames it needs (old name -> new).

    Format 1 listed routers by name (``<mlp>.se_router_<leaf>``) and each linear's router
    name and ``reuse_routing`` flag. A router used by one linear that routes its own input
    becomes that linear's own router; a router shared by several linears, or whose routing
    a down projection reuses, becomes the block's router.
    """
    for key in ("routers", "linears"):
        if not isinstance(block.get(key), dict):
            raise ValueError(f"{where}: format-1 'sparse_expansion' block lacks a '{key}' mapping")
    users: dict[str, list[str]] = {}
    for name, linear in block["linears"].items():
        for key in ("router", "in_features", "out_features", "num_experts", "nnz_total", "bias"):
            if key not in linear:
                raise ValueError(f"{where}: format-1 entry for linear {name} lacks '{key}'")
        if linear["router"] not in block["routers"]:
            raise ValueError(f"{where}: linear {name} names router {linear['router']}, which the block lacks")
        if linear["router"].rpartition(".")[0] != name.rpartition(".")[0]:
            raise ValueError(
                f"{where}: linear {name} points at router {linear['router']} of another module; "
                "a router serves the MLP block it lives in"
            )
        users.setdefault(linear["router"], []).append(name)
    blocks: dict[str, dict[str, Any]] = {}
    renames: dict[str, str] = {}
    for router_name, names in users.items():
        parent = router_name.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        router = block["routers"][router_name]
        router_spec = {"in_features": int(router["in_features"]), "num_experts": int(router["num_experts"])}
        reusing = [n for n in names if block["linears"][n].get("reuse_routing")]
        if reusing and len(reusing) == len(names):
            raise ValueError(
                f"{where}: {', '.join(reusing)} reuse the routing of router {router_name}, which no linear "
                "of the block computes (reuse_routing flag inconsistent with the routers)"
            )
        shared = len(names) > 1 or bool(reusing)
        entry = blocks.setdefault(parent, {"linears": {}})
        for name in names:
            linear = block["linears"][name]
            leaf = name[len(prefix) :]
            entry["linears"][leaf] = {
                "in_features": int(linear["in_features"]),
                "out_features": int(linear["out_features"]),
                "num_experts": int(linear["num_experts"]),
                "nnz_total": int(linear["nnz_total"]),
                "bias": bool(linear["bias"]),
                "router": None if shared else router_spec,
            }
            if not shared:
                for suffix in ("weight", "bias"):
                    renames[f"{router_name}.{suffix}"] = f"{name}.router.{suffix}"
        if shared:
            if "router" in entry:
                raise ValueError(f"{where}: block {parent} has two shared routers; format 1 allowed one")
            entry["router"] = router_spec
            for suffix in ("weight", "bias"):
                renames[f"{router_name}.{suffix}"] = f"{prefix}{BLOCK_ROUTER}.{suffix}"
    spec = parse_spec({"format_version": FORMAT_VERSION, "blocks": blocks}, where)
    return spec, renames
