"""``SparseExpansionModifier``: one-shot mixture of sparse experts inside llm-compressor's pipeline.

Built on llm-compressor's ``SparsityModifierBase`` (as ``SparseGPTModifier`` and
our WD-aware modifier are), so ``targets`` / ``ignore``, ``mask_structure`` and
hook handling mean the same for all three. Lifecycle (sequential pipeline, one
decoder layer per epoch):

- ``on_initialize``: resolve the target linears (default: every FFN linear, by
  architecture) and group those that share an input (gate + up) under one router.
- ``on_calibration_start``: a forward hook (llm-compressor's ``HooksMixin``) on the
  first linear of each group feeds its inputs into that group's :class:`_Calibration`.
- While tokens stream past: the first ``router_fit_tokens`` tokens of a group are
  kept (CPU, float32) to fit its router (PCA + k-means); from then on every batch is
  routed and added to the K per-cluster Hessians at once (``StreamingClusterHessians``),
  so memory is ``O(K d^2 + router_fit_tokens d)`` whatever the calibration size.
- ``on_sequential_epoch_end`` (base, ``compress_modules``): per group, finish its
  Hessians, prune all K experts of each linear in one batched SparseGPT solve, and
  install the expanded layers (``block.install_expanded_block``) before the pipeline
  propagates this layer's outputs (the next layer is calibrated on expanded outputs).
- ``on_finalize``: fail if a target never saw calibration data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from compressed_tensors.utils import match_named_modules, match_targets
from llmcompressor.core import Event, State
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES, SparsityModifierBase
from llmcompressor.modifiers.utils.hooks import HooksMixin
from pydantic import Field, PrivateAttr, field_validator

from sparse_expansion_plugin.modeling.targets import ffn_blocks, is_conv1d, module_weight, weight_as_out_in
from sparse_expansion_plugin.modifiers import register_modifier
from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
from sparse_expansion_plugin.pruning.structure import check_sparsity, normalized_mask_structure
from sparse_expansion_plugin.sparse_expansion.block import install_expanded_block
from sparse_expansion_plugin.sparse_expansion.clustering import (
    FittedRouter,
    cluster_size_summary,
    drop_experts,
    fit_router,
    pca_components_for,
)
from sparse_expansion_plugin.sparse_expansion.hessians import (
    StreamingClusterHessians,
    regularized_hessians,
    second_choice_shares,
    soft_share,
)
from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear

logger = logging.getLogger(__name__)

__all__ = ["SparseExpansionModifier"]


def _as_batch(inputs: torch.Tensor) -> torch.Tensor:
    """A captured input as ``[batch, seq, d]`` (a 2-D input is one sample), detached."""
    inputs = inputs.detach()
    return inputs.unsqueeze(0) if inputs.dim() == 2 else inputs


@dataclass
class _TokenRouting:
    """One batch's routing as the Hessians used it: each token's expert and, with soft Hessians,
    its second-nearest expert and the share of it counted there (kept for a down projection
    routed by the same routing)."""

    first: torch.Tensor
    second: torch.Tensor | None = None
    share: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> _TokenRouting:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return _TokenRouting(self.first.to(device), moved(self.second), moved(self.share))


@dataclass
class _Calibration:
    """What one router group has seen so far in this layer's calibration pass.

    ``sample``: inputs kept to fit the router (and, for a down projection
    calibrated on expanded gate/up outputs, every input); ``assignments``: each
    batch's expert indices once routed, kept (8 bytes a token) for a down
    projection that is routed by this group's routing.
    """

    sample: list[torch.Tensor] = field(default_factory=list)
    sample_tokens: int = 0
    batches_seen: int = 0
    fitted: FittedRouter | None = None
    hessians: StreamingClusterHessians | None = None
    median_gap: float | None = None  # soft Hessians: median d_2^2 - d_1^2 over the router's fit sample
    assignments: list[_TokenRouting] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)  # every input, only when `keep_all`


@dataclass
class _Group:
    """Linears that share one input (and so one router); ``output`` marks an MLP's down projection."""

    names: list[str]
    parent: str
    output: bool = False
    source: _Group | None = None  # down projection calibrated on expanded upstream outputs
    shares: _Group | None = None  # down projection routed by the gate/up router
    keep_all: bool = False  # keep every input (a dependent down projection recomputes from them)
    routes_down: bool = False  # a down projection is routed by this group's routing (keep assignments)
    calib: _Calibration = field(default_factory=_Calibration)
    done: bool = False

    @property
    def leaves(self) -> list[str]:
        prefix = f"{self.parent}." if self.parent else ""
        return [name[len(prefix) :] for name in self.names]


class SparseExpansionModifier(SparsityModifierBase):
    """Sparse Expansion: per FFN linear, one SparseGPT-pruned expert per input cluster, routed per token.

    Sample yaml:

    ```yaml
    sparse_expansion_stage:
      sparse_expansion_modifiers:
        SparseExpansionModifier:
          sparsity: 0.5
          mask_structure: "0:0"
          num_experts: 16
          seed: 0
          ignore: ['re:.*lm_head']
    ```

    :param sparsity: fraction of zeros of every expert, in [0, 1) (ignored for N:M, as upstream)
    :param mask_structure: "N:M" structured pruning, "0:0" unstructured
    :param targets: as llm-compressor's (module names, ``re:`` regexes or class names such as
        ``Linear``); default None: every FFN linear of the architecture
    :param ignore: as llm-compressor's; modules to leave dense
    :param num_experts: experts (clusters) per linear; 1 is stock SparseGPT
    :param pca_reduction: PCA keeps ``in_features // pca_reduction`` components ...
    :param pca_components: ... unless this gives the number explicitly
    :param kmeans_n_init: k-means restarts (scikit-learn), best inertia kept
    :param kmeans_max_iter: k-means iterations
    :param router_fit_tokens: fit each router on the first this-many calibration tokens of its layer
        (oneshot shuffles the calibration samples, so a seeded random sample), then stream the rest
        into the K Hessians: memory stays flat in the number of calibration tokens (measured:
        1.2 GiB per SmolLM2 block at 32k-262k tokens, against 1.4-9.9 GiB keeping every input).
        None keeps every token to fit on (0.1.0's behaviour). Up to this many tokens both are equal
    :param max_fit_tokens: fit PCA/k-means on at most this many (seeded random) of those tokens
    :param input_norm: ``l2`` (default) clusters and routes unit-norm tokens, so a few tokens with
        huge activations do not take every centroid; ``none`` is 0.1.0's behaviour
    :param fit_outlier_quantile: leave tokens whose norm exceeds this quantile out of the fit
    :param seed: seeds PCA and k-means; the same seed gives the same model
    :param share_gate_up_router: gate and up projections share one router (they see the same input)
    :param share_router_with_down: the down projection reuses the gate/up routing of each
        token (one router per MLP block) instead of clustering its own inputs. ``None`` (default):
        wherever the block's gate/up are expanded with one router, else the down projection
        clusters its own inputs; ``true`` requires it (error otherwise); ``false`` never. Chosen
        by measurement: better than own down routers on every text at 8k and 32k calibration
        tokens on SmolLM2 (README), and one fewer k-means per block
    :param down_calibration: ``dense``: the down projection's experts are fitted on the dense
        gate/up outputs of the calibration pass (as stock SparseGPT); ``expanded``: on the
        outputs of the already-expanded gate/up (keeps every MLP input of the layer)
    :param min_cluster_tokens: a cluster with fewer calibration tokens gets ``small_cluster_rule``
    :param small_cluster_rule: ``global`` (use the layer's Hessian), ``dampen`` (more dampening),
        or ``merge`` (drop the cluster; its tokens go to the nearest other one)
    :param small_cluster_dampening: extra dampening (fraction of mean diagonal) for ``dampen``
    :param prior_tokens: ``tau`` (default 64): ``H_k <- (n_k H_k + tau H) / (n_k + tau)`` (per-token
        means): a cluster with few tokens leans on the layer's Hessian, a large one keeps its own;
        0 is 0.1.0's behaviour. Defaults measured on SmolLM2 (README); giving
        ``hessian_shrinkage`` alone turns the prior off
    :param hessian_shrinkage: ``H_k <- (1-lam) H_k + lam H`` whatever the cluster's size, lam in [0, 1]
    :param soft_hessian_scale: soft cluster Hessians (None, default: off). Each calibration token is
        also counted in its second-nearest cluster's Hessian with share
        ``sigmoid(-gap / (scale x median gap))`` (``gap = d_2^2 - d_1^2`` in the router's PCA space,
        median over the router's fit sample) and with ``1 - share`` in its own; routing at inference
        stays hard. Why: with little calibration text each expert overfits its cluster's tokens;
        border tokens are evidence for both neighbours. Measured on SmolLM2 (README): block by block
        +4.5 / +2.3 / 0 points of error closed at 16k / 32k / 131k calibration tokens (0.5 best of
        0.125-2); on the full model at 16k, 3 seeds, it closed +5 / +3 / 0 / +3 points more of the gap
        (Python docs and Jargon File at 512 and 2048 tokens), at 32k (3 seeds) 0 / +1 / 0 / +1: so
        off by default, on in the demo (16k). Costs a second Hessian update per token (about 1.1x
        the compression time at 16k)
    :param block_size: SparseGPT column block size
    :param dampening_frac: SparseGPT dampening, fraction of the mean Hessian diagonal
    :param expert_batch_size: solve at most this many experts at once (memory: E x n x n floats)
    :param materialize_while_calibrating: keep dense expert copies of the layer being propagated
        (one layer at a time) so the pipeline's propagation pass does not unpack them per batch
    """

    sparsity: float = 0.5  # type: ignore[assignment]  # one float (the base allows lists)
    mask_structure: str = "0:0"
    targets: str | list[str] | None = None  # type: ignore[assignment]  # None: FFN linears
    ignore: list[str] = Field(default_factory=list)
    num_experts: int = Field(default=16, ge=1)
    pca_reduction: int = Field(default=32, ge=1)
    pca_components: int | None = Field(default=None, ge=1)
    kmeans_n_init: int = Field(default=1, ge=1)
    kmeans_max_iter: int = Field(default=300, ge=1)
    router_fit_tokens: int | None = Field(default=32768, ge=1)
    max_fit_tokens: int | None = Field(default=None, ge=1)
    input_norm: Literal["none", "l2"] = "l2"
    fit_outlier_quantile: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0
    share_gate_up_router: bool = True
    share_router_with_down: bool | None = None
    down_calibration: Literal["dense", "expanded"] = "dense"
    min_cluster_tokens: int = Field(default=0, ge=0)
    small_cluster_rule: Literal["global", "dampen", "merge"] = "global"
    small_cluster_dampening: float = Field(default=0.1, ge=0)
    prior_tokens: float = Field(default=64.0, ge=0)
    hessian_shrinkage: float = Field(default=0.0, ge=0, le=1)
    soft_hessian_scale: float | None = Field(default=None, gt=0)
    block_size: int = Field(default=128, ge=1)
    dampening_frac: float = Field(default=0.01, ge=0)
    expert_batch_size: int = Field(default=16, ge=1)
    materialize_while_calibrating: bool = True

    _groups: list[_Group] = PrivateAttr(default_factory=list)
    _capture: dict[nn.Module, _Group] = PrivateAttr(default_factory=dict)
    _model: Any = PrivateAttr(default=None)
    _report: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _materialized: list[ExpandedLinear] = PrivateAttr(default_factory=list)
    _notes: dict[str, list[str]] = PrivateAttr(default_factory=dict)  # rule notes per group, for the log

    @field_validator("sparsity", mode="before")
    @classmethod
    def _check_sparsity(cls, value: object) -> float:
        return check_sparsity(value)

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _check_mask(cls, value: object) -> str:
        return normalized_mask_structure(value)

    @field_validator("sparsity_profile", mode="before")
    @classmethod
    def _no_profile(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "SparseExpansionModifier takes no sparsity_profile: every expert gets `sparsity`"
            )
        return None

    # ----------------------------------------------------------------- lifecycle

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Resolve the targets into router groups; fail loudly when nothing matches."""
        if self.hessian_shrinkage > 0 and "prior_tokens" not in self.model_fields_set:
            self.prior_tokens = 0.0  # a fixed shrinkage asked for replaces the default count-based prior
        if self.hessian_shrinkage > 0 and self.prior_tokens > 0:
            raise ValueError(
                "give either prior_tokens (count-based) or hessian_shrinkage (fixed), not both "
                f"(got prior_tokens={self.prior_tokens}, hessian_shrinkage={self.hessian_shrinkage})"
            )
        model = state.model
        self._model = model
        chosen = self._resolve_targets(model)
        self._target_layers = chosen
        self._groups = self._resolve_groups(model, list(chosen))
        self._capture = {}
        for group in self._groups:
            if group.output and group.source is not None:
                continue  # recomputed from the expanded gate/up instead
            self._capture[model.get_submodule(group.names[0])] = group
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
        """One llm-compressor hook per router group (on its first linear): the base would hook every
        target, and skips GPT-2's Conv1D, which is not among its prunable layer types."""
        for module in self._capture:
            self.register_hook(module, self.calibrate_module, "forward")  # type: ignore[arg-type]

    def calibrate_module(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ) -> None:
        """Forward hook (registered by the base on every target): stream this batch into its group."""
        group = self._capture.get(module)
        if group is not None:
            self._observe(group, _as_batch(args[0]))

    def compress_modules(self) -> None:
        """Expand every group calibrated in this epoch (the first epoch, embeddings, has none)."""
        self._release_materialized()  # the previous layer has been propagated by now
        for group in self._groups:
            if group.done:
                continue
            if group.source is not None and group.source.done and not group.calib.batches_seen:
                self._recompute_from_expanded(group)
            if group.calib.batches_seen:
                self._expand_group(group)
        for group in self._groups:  # free what no pending group needs any more
            if group.done and all(g.done for g in self._groups if group in (g.source, g.shares)):
                group.calib = _Calibration()

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        self.compress_modules()  # the basic (non-sequential) pipeline has no epoch ends
        super().on_calibration_end(state, event, **kwargs)

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        self.remove_hooks()
        self._release_materialized()
        left = [g.names[0] for g in self._groups if not g.done]
        if left:
            raise RuntimeError(
                f"SparseExpansion did not see calibration inputs for {len(left)} linears (first: {left[0]}); "
                "are they used in the forward pass of the calibration data?"
            )
        return True

    @property
    def report(self) -> list[dict[str, Any]]:
        """One entry per expanded linear: experts, tokens per cluster, rules applied, seconds."""
        return list(self._report)

    def cluster_summary(self) -> str:
        """Cluster sizes over every expanded linear, as shares of its layer's tokens: the smallest
        cluster anywhere, the median of the layers' median clusters, and the largest cluster, for
        linears reading the MLP input and for down projections apart (where collapses happen)."""
        parts = []
        for kind, is_down in (("MLP input", False), ("down projection", True)):
            shares = [
                sorted(c / max(sum(e["cluster_tokens"]), 1) for c in e["cluster_tokens"])
                for e in self._report
                if e.get("down", False) == is_down
            ]
            if shares:
                medians = sorted(s[len(s) // 2] for s in shares)
                parts.append(
                    f"{kind}: smallest cluster {min(s[0] for s in shares):.2%}, median "
                    f"{medians[len(medians) // 2]:.2%}, largest {max(s[-1] for s in shares):.1%} of a layer's tokens"
                )
        return "; ".join(parts)

    # ----------------------------------------------------------------- targets

    def _resolve_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """Target linears by name: llm-compressor's matching of ``targets`` / ``ignore``, or the FFN linears."""
        if self.targets is None:
            names = [n for b in ffn_blocks(model) for n in (*b.inputs, *((b.output,) if b.output else ()))]
            candidates = {name: model.get_submodule(name) for name in names}
        else:
            targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
            for target in targets:
                if not any(match_targets(n, m, [target]) for n, m in model.named_modules()):
                    leaves = sorted(
                        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                    )
                    raise ValueError(
                        f"SparseExpansion target {target!r} matched no module; targets are full module names, "
                        f"'re:' regexes (e.g. 're:.*mlp\\.down_proj$') or class names such as 'Linear'. "
                        f"Linear leaves here: {', '.join(leaves)}"
                    )
            candidates = {}
            for layer_name, layer in match_named_modules(model, targets):
                for name, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
                    full = f"{layer_name}.{name}" if name else layer_name
                    if isinstance(module, nn.Linear) or is_conv1d(module):
                        candidates[full] = module
        # the base's spelling puts a trailing "." on a target that is itself a linear; accept both
        chosen = {
            name: module
            for name, module in candidates.items()
            if not (
                match_targets(name, module, self.ignore) or match_targets(f"{name}.", module, self.ignore)
            )
        }
        if not chosen:
            raise ValueError(
                f"SparseExpansion targets {self.targets or 'FFN linears'} minus ignore {self.ignore} "
                "leave no linear to expand (targets take module names, 're:' regexes or class names "
                "such as 'Linear')"
            )
        return chosen

    def _resolve_groups(self, model: nn.Module, chosen_names: list[str]) -> list[_Group]:
        chosen = set(chosen_names)
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
                for option, wanted in (
                    ("down_calibration='expanded'", self.down_calibration == "expanded"),
                    ("share_router_with_down: true", self.share_router_with_down is True),
                ):
                    if wanted and source is None:
                        raise ValueError(
                            f"{option} needs all of {block.inputs} expanded with one router "
                            "(share_gate_up_router: true and all of them in targets)"
                        )
                expanded_source = source if self.down_calibration == "expanded" else None
                if expanded_source is not None:
                    expanded_source.keep_all = True
                # None shares wherever it can (source is None when gate/up have no common router)
                shares = source if self.share_router_with_down is not False else None
                if shares is not None:
                    shares.routes_down = True
                groups.append(
                    _Group([block.output], block.parent, output=True, source=expanded_source, shares=shares)
                )
                placed.add(block.output)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        for name in sorted(chosen - placed, key=order.__getitem__):
            groups.append(_Group([name], name.rpartition(".")[0]))
        return groups

    # ----------------------------------------------------------------- calibration

    def _fit_token_budget(self) -> int | None:
        return None if self.down_calibration == "expanded" else self.router_fit_tokens

    def _observe(self, group: _Group, batch: torch.Tensor) -> None:
        """Take one captured batch ``[batch, seq, d]``: keep it for the router fit, or route and add it."""
        calib = group.calib
        calib.batches_seen += 1
        if group.keep_all:
            calib.kept.append(batch.to(device="cpu", dtype=torch.float32))
        if group.shares is not None:  # routed by the gate/up routing of the same tokens
            calib.sample.append(batch.to(device="cpu", dtype=torch.float32))
            calib.sample_tokens += batch.shape[0] * batch.shape[1]
            self._drain_shared(group)
            return
        if calib.fitted is None:
            calib.sample.append(batch.to(device="cpu", dtype=torch.float32))
            calib.sample_tokens += batch.shape[0] * batch.shape[1]
            budget = self._fit_token_budget()
            if budget is not None and calib.sample_tokens >= budget:
                self._fit(group)
            return
        self._add(group, batch)

    def _fit(self, group: _Group) -> None:
        """Fit the group's router on its kept sample, then route the sample into the Hessians."""
        calib = group.calib
        flat = torch.cat([b.reshape(-1, b.shape[-1]) for b in calib.sample])
        components = pca_components_for(flat.shape[1], self.pca_reduction, self.pca_components)
        if self.num_experts > flat.shape[0]:
            raise ValueError(
                f"num_experts={self.num_experts} exceeds the {flat.shape[0]} calibration tokens seen by "
                f"{group.names[0]}: use more calibration samples or fewer experts"
            )
        fitted = fit_router(
            flat,
            self.num_experts,
            components,
            seed=self.seed,
            kmeans_n_init=self.kmeans_n_init,
            kmeans_max_iter=self.kmeans_max_iter,
            max_fit_tokens=self.max_fit_tokens,
            input_norm=self.input_norm,
            fit_outlier_quantile=self.fit_outlier_quantile,
        )
        if self.small_cluster_rule == "merge" and self.min_cluster_tokens:
            while fitted.router.num_experts > 1:
                counts = fitted.counts
                smallest = int(counts.argmin())
                if int(counts[smallest]) >= self.min_cluster_tokens:
                    break
                group_notes = self._notes.setdefault(group.names[0], [])
                group_notes.append(
                    f"merged cluster of {int(counts[smallest])} tokens < {self.min_cluster_tokens} into its neighbours"
                )
                fitted = drop_experts(fitted, flat, [smallest])
        calib.fitted = fitted
        if self.soft_hessian_scale is not None and fitted.router.num_experts > 1:
            _, _, gap = second_choice_shares(fitted.router.scores(flat))
            # numpy's median (the mean of the two middle values), not torch's lower middle one
            calib.median_gap = float(np.median(gap.cpu().numpy()))
            logger.info(
                "SparseExpansion %s: soft Hessians, median score gap %.4g over %d fit tokens, scale %g",
                group.names[0],
                calib.median_gap,
                gap.shape[0],
                self.soft_hessian_scale,
            )
        device = module_weight(self._model.get_submodule(group.names[0])).device
        calib.hessians = StreamingClusterHessians(fitted.router.num_experts, flat.shape[1], device=device)
        sample, calib.sample, calib.sample_tokens = calib.sample, [], 0
        for batch in sample:
            self._add(group, batch)

    def _add(self, group: _Group, batch: torch.Tensor) -> None:
        """Route ``batch`` with the group's router and add it to the per-cluster Hessians."""
        calib = group.calib
        assert calib.fitted is not None and calib.hessians is not None
        router = calib.fitted.router
        if router.num_experts == 1:
            routing = _TokenRouting(torch.zeros(batch.shape[0] * batch.shape[1], dtype=torch.long))
        elif calib.median_gap is not None and self.soft_hessian_scale is not None:
            first, second, gap = second_choice_shares(router.to(batch.device).scores(batch))
            routing = _TokenRouting(first, second, soft_share(gap, calib.median_gap, self.soft_hessian_scale))
        else:
            routing = _TokenRouting(router.to(batch.device).scores(batch).argmax(dim=1))
        calib.hessians.add(batch, routing.first, routing.second, routing.share)
        if group.routes_down:
            calib.assignments.append(routing.to("cpu"))

    def _drain_shared(self, group: _Group) -> None:
        """Add the kept batches of a down projection whose gate/up routing is known by now."""
        source, calib = group.shares, group.calib
        assert source is not None
        if source.calib.fitted is None:
            return
        if calib.hessians is None:
            calib.fitted = source.calib.fitted
            dim = calib.sample[0].shape[-1] if calib.sample else 1
            device = module_weight(self._model.get_submodule(group.names[0])).device
            calib.hessians = StreamingClusterHessians(
                source.calib.fitted.router.num_experts, dim, device=device
            )
        while calib.sample:
            index = calib.batches_seen - len(calib.sample)
            if index >= len(source.calib.assignments):
                return  # the gate/up routing of this batch is not known yet
            batch = calib.sample.pop(0)
            calib.sample_tokens -= batch.shape[0] * batch.shape[1]
            routing = source.calib.assignments[index]
            if routing.first.shape[0] != batch.shape[0] * batch.shape[1]:
                raise RuntimeError(
                    f"{group.names[0]}: the gate/up routing covers {routing.first.shape[0]} tokens of this batch "
                    f"but the down projection saw {batch.shape[0] * batch.shape[1]}; share_router_with_down "
                    "needs both in the same calibration pass"
                )
            routing = routing.to(calib.hessians.device)
            calib.hessians.add(batch.to(calib.hessians.device), routing.first, routing.second, routing.share)

    def _release_materialized(self) -> None:
        for layer in self._materialized:
            layer.materialize(False)
        self._materialized = []

    @torch.no_grad()
    def _recompute_from_expanded(self, group: _Group) -> None:
        """Down-projection inputs from the expanded gate/up: run the MLP on its kept inputs."""
        source = group.source
        assert source is not None
        mlp = self._model.get_submodule(group.parent)
        down = self._model.get_submodule(group.names[0])
        weight = module_weight(down)
        captured: list[torch.Tensor] = []

        def grab(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured.append(_as_batch(args[0]).to(device="cpu", dtype=torch.float32))

        handle = down.register_forward_pre_hook(grab)
        try:
            with HooksMixin.disable_hooks():
                for batch in source.calib.kept:
                    mlp(batch.to(device=weight.device, dtype=weight.dtype))
        finally:
            handle.remove()
        for batch in captured:
            self._observe(group, batch)

    @torch.no_grad()
    def _expand_group(self, group: _Group) -> None:
        start = time.perf_counter()
        calib = group.calib
        if group.shares is not None:
            if group.shares.calib.fitted is None:
                raise RuntimeError(
                    f"{group.names[0]}: the gate/up router of this layer was never fitted; "
                    "share_router_with_down needs both in the same calibration pass"
                )
            self._drain_shared(group)
            if calib.sample:
                raise RuntimeError(
                    f"{group.names[0]}: {len(calib.sample)} batches have no gate/up routing; "
                    "share_router_with_down needs both in the same calibration pass"
                )
        elif calib.fitted is None:
            self._fit(group)
        assert calib.fitted is not None and calib.hessians is not None
        fitted = calib.fitted
        num_experts = fitted.router.num_experts
        stats = calib.hessians.result()
        notes = self._notes.pop(group.names[0], [])
        hessians, rule_notes = regularized_hessians(
            stats,
            shrinkage=self.hessian_shrinkage,
            min_cluster_tokens=self.min_cluster_tokens,
            small_cluster_rule=self.small_cluster_rule,
            small_cluster_dampening=self.small_cluster_dampening,
            prior_tokens=self.prior_tokens,
        )
        notes.extend(rule_notes)
        counts = list(stats.tokens)
        del stats
        first = self._model.get_submodule(group.names[0])
        device = module_weight(first).device
        # a router that serves several linears (gate and up), or whose routing the down projection
        # reuses, routes the block's input and belongs to the block; otherwise the linear owns it
        own_router = group.shares is None and len(group.names) == 1 and not group.routes_down
        layers: dict[str, ExpandedLinear] = {}
        for name, leaf in zip(group.names, group.leaves, strict=True):
            module = self._model.get_submodule(name)
            weight = weight_as_out_in(module).detach()
            pruned, keep = self._solve(weight, hessians)
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            router = fitted.router.to(device) if own_router else None
            layer = ExpandedLinear.from_experts(pruned.to(weight.dtype), router, bias, keep).to(device)
            layers[leaf] = layer
            if self.materialize_while_calibrating:
                layer.materialize(experts=pruned)
                self._materialized.append(layer)
            self._report.append(
                {
                    "name": name,
                    "num_experts": num_experts,
                    "cluster_tokens": counts,
                    "down": group.output,
                    "rules": notes,
                    "seconds": time.perf_counter() - start,
                }
            )
        block_router = None if own_router or group.shares is not None else fitted.router.to(device)
        install_expanded_block(self._model, group.parent, layers, block_router)
        for note in notes:
            logger.info("SparseExpansion %s: %s", group.names[0], note)
        logger.info(
            "SparseExpansion: expanded %s into %d experts (cluster %s) in %.1fs",
            ", ".join(group.names),
            num_experts,
            cluster_size_summary(counts),
            time.perf_counter() - start,
        )
        group.done = True

    def _solve(self, weight: torch.Tensor, hessians: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched SparseGPT of ``weight [out, in]`` under each of ``hessians [K, in, in]``, chunked over K."""
        pruned, keep = [], []
        for start in range(0, hessians.shape[0], self.expert_batch_size):
            chunk = hessians[start : start + self.expert_batch_size]
            w, k = sparsegpt_prune(
                weight.to(chunk.device),
                chunk,
                sparsity=self.sparsity,
                prune_n=self._prune_n or 0,
                prune_m=self._prune_m or 0,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
            )
            if w.dim() == 2:
                w, k = w.unsqueeze(0), k.unsqueeze(0)
            pruned.append(w)
            keep.append(k)
        return torch.cat(pruned), torch.cat(keep)


register_modifier(
    "SparseExpansionModifier", SparseExpansionModifier
)  # recipes can name it (see modifiers/__init__.py)
