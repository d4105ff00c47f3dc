"""``SparseExpansionModifier``: one-shot mixture of sparse experts inside llm-compressor's pipeline.

Lifecycle (sequential pipeline, one decoder layer per epoch):

- ``on_initialize``: find the target linears (default: every FFN linear, by
  architecture) and group those that share an input (gate + up) under one router.
- ``on_calibration_start``: a forward hook on the first linear of each group
  keeps its inputs (CPU, float32) during the layer's calibration pass.
- ``on_sequential_epoch_end``: per group, fit PCA + k-means on the inputs,
  fold them into a router, accumulate every cluster's Hessian in one pass,
  prune all K experts of each linear in one batched SparseGPT solve, and
  replace the linears by ``ExpandedLinear`` before the pipeline propagates
  this layer's outputs (so the next layer is calibrated on expanded outputs).
  The down projection is calibrated on the dense upstream outputs seen in the
  calibration pass, or (``down_calibration: expanded``) on the outputs of the
  already-expanded gate/up recomputed from the kept MLP inputs.
- ``on_calibration_end`` / ``on_finalize``: compress anything left, drop hooks.

Why inputs are kept rather than streamed: clusters must be known before their
Hessians can be accumulated, and one layer's FFN inputs are small (64 x 512
tokens x 1536 floats = 200 MB for SmolLM2's down projection).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from llmcompressor.core import Event, State
from llmcompressor.modifiers.modifier import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from pydantic import Field, PrivateAttr, field_validator, model_validator

from sparse_expansion_plugin.modeling.targets import ffn_blocks, module_weight, select_linears
from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
from sparse_expansion_plugin.sparse_expansion.clustering import drop_experts, fit_router, pca_components_for
from sparse_expansion_plugin.sparse_expansion.hessians import (
    SMALL_CLUSTER_RULES,
    cluster_hessians,
    regularized_hessians,
)
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear, replace_module

logger = logging.getLogger(__name__)

__all__ = ["SparseExpansionModifier"]

ROUTER_PREFIX = "se_router_"
"""Routers live on the MLP block as ``<parent>.se_router_<first linear's leaf name>``."""


@dataclass
class _Group:
    """Linears that share one input (and so one router); ``output`` marks an MLP's down projection."""

    names: list[str]
    parent: str
    output: bool = False
    source: _Group | None = None  # for a down projection calibrated on expanded upstream outputs
    shares: _Group | None = None  # for a down projection routed by the gate/up router
    batches: list[torch.Tensor] = field(default_factory=list)
    fitted: Any = None  # the FittedRouter, kept while a down projection still needs it
    done: bool = False

    @property
    def router_name(self) -> str:
        leaf = self.names[0].rsplit(".", 1)[-1]
        return f"{self.parent}.{ROUTER_PREFIX}{leaf}" if self.parent else f"{ROUTER_PREFIX}{leaf}"


def _weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module_weight(module).detach()
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


class SparseExpansionModifier(Modifier):
    """Sparse Expansion: per FFN linear, one SparseGPT-pruned expert per input cluster, routed per token.

    Sample yaml:

    ```yaml
    sparse_expansion_stage:
      sparse_expansion_modifiers:
        SparseExpansionModifier:
          sparsity: 0.5
          mask_structure: "0:0"
          num_experts: 16
          pca_reduction: 32
          seed: 0
          share_gate_up_router: true
          down_calibration: dense
          min_cluster_tokens: 0
          small_cluster_rule: global
          hessian_shrinkage: 0.0
    ```

    :param sparsity: fraction of zeros of every expert, in [0, 1) (ignored for N:M, as upstream)
    :param mask_structure: "N:M" structured pruning, "0:0" unstructured
    :param num_experts: experts (clusters) per linear; 1 is stock SparseGPT
    :param pca_reduction: PCA keeps ``in_features // pca_reduction`` components ...
    :param pca_components: ... unless this gives the number explicitly
    :param kmeans_n_init: k-means restarts (scikit-learn), best inertia kept
    :param kmeans_max_iter: k-means iterations
    :param max_fit_tokens: fit PCA/k-means on at most this many (seeded random) tokens
    :param seed: seeds PCA and k-means; the same seed gives the same model
    :param targets: linear names (suffixes) or ``re:`` regexes; default: every FFN linear
    :param ignore: names or ``re:`` regexes to leave dense
    :param share_gate_up_router: gate and up projections share one router (they see the same input)
    :param share_router_with_down: the down projection reuses the gate/up routing of each
        token (one router per MLP block) instead of clustering its own inputs
    :param down_calibration: ``dense``: the down projection's experts are fitted on the dense
        gate/up outputs of the calibration pass (as stock SparseGPT); ``expanded``: on the
        outputs of the already-expanded gate/up
    :param min_cluster_tokens: a cluster with fewer calibration tokens gets ``small_cluster_rule``
    :param small_cluster_rule: ``global`` (use the layer's Hessian), ``dampen`` (more dampening),
        or ``merge`` (drop the cluster; its tokens go to the nearest other one)
    :param small_cluster_dampening: extra dampening (fraction of mean diagonal) for ``dampen``
    :param hessian_shrinkage: ``H_k <- (1-lam) H_k + lam H_global`` (per-token means), lam in [0, 1]
    :param block_size: SparseGPT column block size
    :param dampening_frac: SparseGPT dampening, fraction of the mean Hessian diagonal
    :param expert_batch_size: solve at most this many experts at once (memory: E x n x n floats)
    :param materialize_while_calibrating: keep dense expert copies of the layer being propagated
        (one layer at a time) so the pipeline's propagation pass does not unpack them per batch
    """

    sparsity: float = 0.5
    mask_structure: str = "0:0"
    num_experts: int = Field(default=16, ge=1)
    pca_reduction: int = Field(default=32, ge=1)
    pca_components: int | None = None
    kmeans_n_init: int = Field(default=1, ge=1)
    kmeans_max_iter: int = Field(default=300, ge=1)
    max_fit_tokens: int | None = None
    seed: int = 0
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    share_gate_up_router: bool = True
    share_router_with_down: bool = False
    down_calibration: Literal["dense", "expanded"] = "dense"
    min_cluster_tokens: int = Field(default=0, ge=0)
    small_cluster_rule: Literal["global", "dampen", "merge"] = "global"
    small_cluster_dampening: float = Field(default=0.1, ge=0)
    hessian_shrinkage: float = Field(default=0.0, ge=0, le=1)
    block_size: int = Field(default=128, ge=1)
    dampening_frac: float = Field(default=0.01, ge=0)
    expert_batch_size: int = Field(default=16, ge=1)
    materialize_while_calibrating: bool = True

    requires_calibration_data: bool = True

    _groups: list[_Group] = PrivateAttr(default_factory=list)
    _model: Any = PrivateAttr(default=None)
    _prune_n: int = PrivateAttr(default=0)
    _prune_m: int = PrivateAttr(default=0)
    _report: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _materialized: list[ExpandedLinear] = PrivateAttr(default_factory=list)

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {value} (0.5 prunes half of every expert)")
        return value

    @field_validator("mask_structure")
    @classmethod
    def _check_mask(cls, value: str) -> str:
        match = re.fullmatch(r"(\d+):(\d+)", value.strip())
        if not match:
            raise ValueError(
                f"mask_structure must look like 'N:M' (e.g. '2:4', or '0:0' for none), got {value!r}"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if (n == 0) != (m == 0) or (m and n >= m):
            raise ValueError(f"mask_structure needs 0 < N < M (or '0:0'), got {value!r}")
        return value.strip()

    @model_validator(mode="after")
    def _split_mask(self) -> SparseExpansionModifier:
        n, m = self.mask_structure.split(":")
        self._prune_n, self._prune_m = int(n), int(m)
        if self.small_cluster_rule not in SMALL_CLUSTER_RULES:  # pragma: no cover - Literal guards it
            raise ValueError(f"small_cluster_rule must be one of {SMALL_CLUSTER_RULES}")
        return self

    # ----------------------------------------------------------------- lifecycle

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Resolve the targets into router groups; fail loudly when nothing matches."""
        model = state.model
        self._model = model
        self._groups = self._resolve_groups(model)
        if self.down_calibration == "expanded":
            for group in self._groups:
                if group.output and group.source is not None:
                    parent = model.get_submodule(group.parent)
                    if not re.search(r"mlp|feedforward|ffn", type(parent).__name__, re.IGNORECASE):
                        raise ValueError(
                            f"down_calibration='expanded' needs an MLP module whose forward takes the "
                            f"gate/up input; {group.parent} is a {type(parent).__name__}. "
                            "Use down_calibration='dense' for this architecture."
                        )
        logger.info(
            "SparseExpansion: %d linears in %d router groups, %d experts, sparsity %s%s",
            sum(len(g.names) for g in self._groups),
            len(self._groups),
            self.num_experts,
            self.sparsity,
            f" ({self.mask_structure})" if self._prune_n else "",
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """Keep each group's inputs during every layer's calibration pass."""
        for group in self._groups:
            if group.output and group.source is not None:
                continue  # recomputed from the expanded gate/up instead
            module = self._model.get_submodule(group.names[0])
            self.register_hook(module, self._capture(group), "forward")

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module] | None = None, **kwargs: Any
    ) -> None:
        """Expand every group calibrated in this epoch (the first epoch, embeddings, has none)."""
        self._expand_calibrated()

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        self._expand_calibrated()  # the basic (non-sequential) pipeline has no epoch ends
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        self.remove_hooks()
        self._release_materialized()
        left = [g.names[0] for g in self._groups if not g.done]
        if left:
            raise RuntimeError(
                f"SparseExpansion did not see calibration inputs for {len(left)} linears (first: {left[0]}); "
                "are they used in the forward pass of the calibration data?"
            )
        for module in self._model.modules():
            if hasattr(module, "clear_cache") and type(module).__name__ == "ExpertRouter":
                module.clear_cache()
        return True

    @property
    def report(self) -> list[dict[str, Any]]:
        """One entry per expanded linear: experts, tokens per cluster, rules applied, seconds."""
        return list(self._report)

    # ----------------------------------------------------------------- targets

    def _resolve_groups(self, model: nn.Module) -> list[_Group]:
        chosen = set(select_linears(model, self.targets) if self.targets else [])
        if self.targets is None:
            chosen = {n for b in ffn_blocks(model) for n in (*b.inputs, *((b.output,) if b.output else ()))}
        chosen = {n for n in chosen if not _matches(n, self.ignore)}
        if not chosen:
            raise ValueError(
                f"SparseExpansion targets {self.targets or 'FFN linears'} minus ignore {self.ignore} "
                "leave no linear to expand"
            )
        try:
            blocks = ffn_blocks(model)
        except ValueError:
            blocks = []
        groups: list[_Group] = []
        placed: set[str] = set()
        for block in blocks:
            inputs = [n for n in block.inputs if n in chosen]
            input_groups = [inputs] if (self.share_gate_up_router and inputs) else [[n] for n in inputs]
            source = None
            for names in input_groups:
                group = _Group(names, block.parent)
                groups.append(group)
                source = group if len(names) == len(block.inputs) else None
            placed.update(inputs)
            if block.output in chosen:
                expanded_source = source if self.down_calibration == "expanded" else None
                if self.down_calibration == "expanded" and source is None:
                    raise ValueError(
                        f"down_calibration='expanded' needs all of {block.inputs} expanded with one router "
                        "(share_gate_up_router: true and all of them in targets)"
                    )
                if self.share_router_with_down and source is None:
                    raise ValueError(
                        f"share_router_with_down needs all of {block.inputs} expanded with one router "
                        "(share_gate_up_router: true and all of them in targets)"
                    )
                shares = source if self.share_router_with_down else None
                groups.append(
                    _Group([block.output], block.parent, output=True, source=expanded_source, shares=shares)
                )
                placed.add(block.output)
        for name in sorted(chosen - placed, key=list(dict(model.named_modules())).index):
            groups.append(_Group([name], name.rpartition(".")[0]))
        return groups

    # ----------------------------------------------------------------- calibration

    def _capture(self, group: _Group):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            inputs = args[0].detach()
            if inputs.dim() == 2:
                inputs = inputs.unsqueeze(0)
            group.batches.append(inputs.to(device="cpu", dtype=torch.float32))

        return hook

    def _release_materialized(self) -> None:
        for layer in self._materialized:
            layer.materialize(False)
        self._materialized = []

    def _expand_calibrated(self) -> None:
        self._release_materialized()  # the previous layer has been propagated by now
        for group in self._groups:
            if group.done:
                continue
            if group.source is not None and group.source.done and not group.batches:
                self._recompute_from_expanded(group)
            if group.batches:
                self._expand_group(group)
        for group in self._groups:  # free inputs once every dependent group is done
            if group.done and all(g.done for g in self._groups if group in (g.source, g.shares)):
                group.batches = []
                group.fitted = None

    @torch.no_grad()
    def _recompute_from_expanded(self, group: _Group) -> None:
        """Down-projection inputs from the expanded gate/up: run the MLP on its kept inputs."""
        source = group.source
        if source is None:
            raise RuntimeError(f"{group.names[0]} has no expanded gate/up group to recompute its inputs from")
        mlp = self._model.get_submodule(group.parent)
        down = self._model.get_submodule(group.names[0])
        captured: list[torch.Tensor] = []

        def grab(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured.append(args[0].detach().to(device="cpu", dtype=torch.float32))

        handle = down.register_forward_pre_hook(grab)
        device = down.weight.device
        dtype = down.weight.dtype
        try:
            with HooksMixin.disable_hooks():
                for batch in source.batches:
                    mlp(batch.to(device=device, dtype=dtype))
        finally:
            handle.remove()
        group.batches = [c if c.dim() == 3 else c.unsqueeze(0) for c in captured]

    @torch.no_grad()
    def _expand_group(self, group: _Group) -> None:
        start = time.perf_counter()
        batches = group.batches
        flat = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
        first = self._model.get_submodule(group.names[0])
        device = first.weight.device
        components = pca_components_for(flat.shape[1], self.pca_reduction, self.pca_components)
        if self.num_experts > flat.shape[0]:
            raise ValueError(
                f"num_experts={self.num_experts} exceeds the {flat.shape[0]} calibration tokens seen by "
                f"{group.names[0]}: use more calibration samples or fewer experts"
            )
        notes: list[str] = []
        if group.shares is not None:  # route by the gate/up router: same tokens, same order
            fitted = group.shares.fitted
            if fitted is None or len(fitted.assignment) != flat.shape[0]:
                raise RuntimeError(
                    f"{group.names[0]}: the gate/up routing of this layer is missing or covers a different "
                    "number of tokens; share_router_with_down needs both in the same calibration pass"
                )
        else:
            fitted = fit_router(
                flat,
                self.num_experts,
                components,
                seed=self.seed,
                kmeans_n_init=self.kmeans_n_init,
                kmeans_max_iter=self.kmeans_max_iter,
                max_fit_tokens=self.max_fit_tokens,
            )
        if self.small_cluster_rule == "merge" and self.min_cluster_tokens and group.shares is None:
            while fitted.router.num_experts > 1:
                counts = fitted.counts
                smallest = int(counts.argmin())
                if int(counts[smallest]) >= self.min_cluster_tokens:
                    break
                notes.append(
                    f"merged cluster of {int(counts[smallest])} tokens < {self.min_cluster_tokens} into its neighbours"
                )
                fitted = drop_experts(fitted, flat, [smallest])
        num_experts = fitted.router.num_experts
        sizes = [b.reshape(-1, b.shape[-1]).shape[0] for b in batches]
        assignments = list(torch.split(fitted.assignment, sizes))
        stats = cluster_hessians(batches, assignments, num_experts, device=device)
        hessians, rule_notes = regularized_hessians(
            stats,
            shrinkage=self.hessian_shrinkage,
            min_cluster_tokens=self.min_cluster_tokens,
            small_cluster_rule=self.small_cluster_rule,
            small_cluster_dampening=self.small_cluster_dampening,
        )
        notes.extend(rule_notes)
        del stats
        router = fitted.router.to(device)
        for name in group.names:
            module = self._model.get_submodule(name)
            weight = _weight_as_out_in(module)
            pruned, keep = self._solve(weight, hessians)
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            expanded = ExpandedLinear.from_experts(
                pruned.to(weight.dtype), router, bias, keep, reuse_routing=group.shares is not None
            )
            replace_module(self._model, name, expanded.to(device))
            if self.materialize_while_calibrating:
                expanded.materialize(experts=pruned)
                self._materialized.append(expanded)
            self._report.append(
                {
                    "name": name,
                    "num_experts": num_experts,
                    "cluster_tokens": torch.bincount(fitted.assignment, minlength=num_experts).tolist(),
                    "rules": notes,
                    "seconds": time.perf_counter() - start,
                }
            )
        if group.shares is None:
            replace_module(self._model, group.router_name, router)
        group.fitted = fitted
        for note in notes:
            logger.info("SparseExpansion %s: %s", group.names[0], note)
        counts = torch.bincount(fitted.assignment, minlength=num_experts)
        logger.info(
            "SparseExpansion: expanded %s into %d experts (cluster tokens min %d / median %d / max %d) in %.1fs",
            ", ".join(group.names),
            num_experts,
            int(counts.min()),
            int(counts.median()),
            int(counts.max()),
            time.perf_counter() - start,
        )
        group.done = True
        if not any(group in (g.source, g.shares) for g in self._groups):
            group.batches = []
            group.fitted = None

    def _solve(self, weight: torch.Tensor, hessians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched SparseGPT of ``weight [out, in]`` under each of ``hessians [K, in, in]``, chunked over K."""
        pruned, keep = [], []
        for start in range(0, hessians.shape[0], self.expert_batch_size):
            chunk = hessians[start : start + self.expert_batch_size]
            w, k = sparsegpt_prune(
                weight.to(chunk.device),
                chunk,
                sparsity=self.sparsity,
                prune_n=self._prune_n,
                prune_m=self._prune_m,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
            )
            if w.dim() == 2:
                w, k = w.unsqueeze(0), k.unsqueeze(0)
            pruned.append(w)
            keep.append(k)
        return torch.cat(pruned), torch.cat(keep)
