"""What a Sparse Expansion run will cost before it runs: memory of compression and inference, FLOPs per token.

Why: a K = 16 expansion of a 7B+ model runs for hours, and whether it fits
(calibration inputs kept for the router fit, K Hessians, the batched SparseGPT
workspace, packed and dense expert copies) was only learnt by running out of
memory part-way. Everything here is computed from the model's *shapes*: the
FFN linears are read from a meta-device model (no weights are allocated) with
the same :func:`~sparse_expansion_plugin.modeling.targets.ffn_blocks` the
modifier uses, and the bytes follow what ``SparseExpansionModifier`` (its
defaults: gate and up share the block's router, the down projection is routed by
it too, ``share_router_with_down=False`` plans a router of the down projection's
own; ``down_calibration="dense"``) allocates, phase by phase:

- calibration: the first ``router_fit_tokens`` inputs of each router group are
  kept on the host in float32 (``None``: every token, until the layer ends);
  the router fit (PCA + k-means, ``clustering.fit_router``) holds the sample,
  one concatenated copy and two float64 copies for the projection, so it peaks
  at ``24 * tokens * d`` bytes; a down projection routed by the block's router
  fits nothing (its kept inputs wait for the block's routing); afterwards the K
  Hessians ``[K, d, d]`` float32 of every group live on the execution device;
- compression of each group (``compress_modules``): the accumulated Hessians,
  their scaled and regularized copies, then per linear the batched SparseGPT
  solve of ``E = min(K, expert_batch_size)`` experts (``pruning/sparsegpt.py``:
  private copies of ``W [E, out, n]`` and ``H [E, n, n]``, the Cholesky factor,
  the inverse and its factor at once, then ``Hinv``, ``W``, the block update's
  ``[E, out, n]`` temporary and the bool mask), the concatenation of the
  chunks, and packing (values + 1-bit mask); the dense pruned experts of the
  previous linear of the group are still alive while the next one is solved;
- ``materialize_while_calibrating``: the layer's dense experts (``K * out * in * b``)
  stay on the device until the next layer has been calibrated.

A :class:`Phase` is one moment of that timeline with the bytes alive at once on
the execution device and on the host, so a peak is a maximum over phases,
never a sum of maxima. Not counted: allocator slack, library workspaces,
Python objects; the llm-compressor pipeline's own activations are estimated
separately (:attr:`LayerPlan.pipeline_device_bytes`, ``pipeline_host_bytes``),
not measured. ``tests/test_plan.py`` and ``benchmarks/plan_check.py`` compare
the expansion's working set with measured peaks.

Inference: packed experts (values + bitmask, ``packing.py``), PyTorch
semi-structured 2:4 (values + 1/8 byte of metadata per position, only for
``2:4``), or dense expert copies; FLOPs per token of the FFN linears as
``cost.py`` counts them. Packed experts on a GPU are unpacked per call: the
forward of one linear holds all K of its experts dense for a moment, plus the
bool mask and ``masked_scatter_``'s int64 prefix sum of one unpacking step
(``packing.device_unpack_bytes``; decoding's per-token gather is only taken
when it needs less), so a packed model needs its weights plus the largest such
transient (:meth:`Plan.inference_peak_bytes`). Activations are not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from sparse_expansion_plugin.sparse_expansion.packing import device_unpack_bytes

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per weight value of the model dtypes a plan accepts."""

HOST_FLOAT = 4  # kept calibration inputs and Hessians are float32 (modifier, SGPT_PRECISION)
INDEX_BYTES = 8  # int64: ``nnz`` per expert
FIT_BYTES_PER_VALUE = 24  # sample (4) + concatenated copy (4) + two float64 copies in fit_router (16)
L2_FIT_BYTES_PER_VALUE = 4  # input_norm="l2": the unit-norm copy of the tokens the router fits on


@dataclass(frozen=True)
class LinearShape:
    """One FFN linear to expand: its module name, ``[out, in]`` and whether it has a bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class RouterGroup:
    """Linears that share one input (gate + up), or a down projection; ``own_router``: whether the
    group fits and stores a router (False for a down projection routed by its block's router)."""

    linears: tuple[LinearShape, ...]
    own_router: bool = True

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features


@dataclass(frozen=True)
class LayerShape:
    """The router groups of one decoder layer and the parameter count of the whole layer."""

    index: int
    name: str
    groups: tuple[RouterGroup, ...]
    params: int


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: its decoder layers and the parameters outside them."""

    model_type: str
    hidden_size: int
    layers: tuple[LayerShape, ...]
    other_params: int  # embeddings, final norm, untied lm_head


@dataclass(frozen=True)
class Phase:
    """Bytes alive at one moment of one layer's expansion, beyond the model's own weights.

    device: on the execution device (the GPU; the CPU when there is none);
    host: on the CPU; host_staging: host copies made only when the device is not the
    CPU (``pack_experts`` packs on the host), absent from a CPU-only run.
    """

    name: str
    device: int
    host: int
    host_staging: int = 0

    @property
    def single_device(self) -> int:
        """Bytes alive at once when the execution device is the CPU itself."""
        return self.device + self.host


@dataclass
class LayerPlan:
    """One decoder layer: its expansion's peaks and what the expanded layer costs at inference.

    ``*_flops`` are per token, FFN linears only (as ``cost.py``): ``dense`` the
    original layer, ``routed`` with a dense kernel per expert plus routers,
    ``nonzero`` counting kept weights only plus routers.
    """

    index: int
    name: str
    phases: list[Phase]
    layer_weight_bytes: int
    pipeline_device_bytes: int
    pipeline_host_bytes: int
    host_model_bytes: int  # the offloaded model while this layer is compressed
    dense_ffn_bytes: int
    packed_bytes: int
    semi_structured_bytes: int | None
    dense_expert_bytes: int
    router_bytes: int
    unpack_transient_bytes: int  # packed experts on a GPU: the largest linear's per-call unpacking
    dense_flops: int
    routed_flops: int
    nonzero_flops: int
    router_flops: int

    @property
    def device_peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.device)

    @property
    def host_peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.host + p.host_staging)

    @property
    def gpu_peak_bytes(self) -> int:
        """Execution device during this layer: onloaded layer weights + working set + one batch's forward."""
        return self.layer_weight_bytes + self.device_peak_phase.device + self.pipeline_device_bytes

    @property
    def cpu_peak_bytes(self) -> int:
        """Host during this layer: the offloaded model so far + kept inputs / fit temporaries + pipeline cache."""
        phase = self.host_peak_phase
        return self.host_model_bytes + phase.host + phase.host_staging + self.pipeline_host_bytes

    @property
    def working_peak_bytes(self) -> int:
        """The expansion's own peak when everything runs on the CPU (what a CPU-only run adds to RSS)."""
        return max(p.single_device for p in self.phases)


@dataclass
class Plan:
    """A whole model's plan: settings, one :class:`LayerPlan` per decoder layer, totals."""

    model_type: str
    num_experts: int
    sparsity: float
    mask_structure: str
    density: float
    calibration_tokens: int
    router_fit_tokens: int | None
    dtype: str
    expert_batch_size: int
    materialize_while_calibrating: bool
    batch_tokens: int
    layers: list[LayerPlan]
    other_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_value(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def gpu_peak_bytes(self) -> int:
        """Compression peak on the execution device (the largest layer's)."""
        return max(layer.gpu_peak_bytes for layer in self.layers)

    @property
    def cpu_peak_bytes(self) -> int:
        """Compression peak on the host (the last layers', when experts outgrow the dense FFN)."""
        return max(layer.cpu_peak_bytes for layer in self.layers)

    @property
    def dense_model_bytes(self) -> int:
        """The whole dense model's weights in ``dtype``."""
        return self.other_params * self.bytes_per_value + sum(
            layer.layer_weight_bytes for layer in self.layers
        )

    def _model_bytes(self, experts: int) -> int:
        """Whole model at inference with the FFN linears replaced by ``experts`` bytes of experts."""
        dense_ffn = sum(layer.dense_ffn_bytes for layer in self.layers)
        return self.dense_model_bytes - dense_ffn + experts

    @property
    def packed_model_bytes(self) -> int:
        return self._model_bytes(sum(layer.packed_bytes for layer in self.layers))

    @property
    def semi_structured_model_bytes(self) -> int | None:
        parts = [layer.semi_structured_bytes for layer in self.layers]
        if any(p is None for p in parts):
            return None
        return self._model_bytes(sum(p for p in parts if p is not None))

    @property
    def dense_experts_model_bytes(self) -> int:
        return self._model_bytes(sum(layer.dense_expert_bytes for layer in self.layers))

    def fits(self, gpu_memory_bytes: int) -> bool:
        """Whether compression (the sequential pipeline, one layer onloaded at a time) fits one device."""
        if gpu_memory_bytes <= 0:
            raise ValueError(f"gpu_memory_bytes must be positive, got {gpu_memory_bytes}")
        return self.gpu_peak_bytes <= gpu_memory_bytes

    @property
    def unpack_transient_bytes(self) -> int:
        """Packed experts on a GPU: the largest one-linear unpacking transient of the model."""
        return max(layer.unpack_transient_bytes for layer in self.layers)

    def inference_peak_bytes(self, storage: str = "packed") -> int | None:
        """Weights of the whole expanded model on one device plus, for ``packed`` experts, the
        largest unpacking transient (activations aside); None for ``semi_structured`` unless 2:4."""
        sizes = {
            "packed": self.packed_model_bytes + self.unpack_transient_bytes,
            "semi_structured": self.semi_structured_model_bytes,
            "dense": self.dense_experts_model_bytes,
        }
        if storage not in sizes:
            raise ValueError(f"storage must be one of {sorted(sizes)}, got {storage!r}")
        return sizes[storage]

    def inference_fits(self, gpu_memory_bytes: int, storage: str = "packed") -> bool | None:
        """Whether :meth:`inference_peak_bytes` of ``storage`` (``packed``, ``semi_structured``,
        ``dense``) fits one device; None for ``semi_structured`` when the experts are not 2:4."""
        size = self.inference_peak_bytes(storage)
        return None if size is None else size <= gpu_memory_bytes


# ----------------------------------------------------------------- shapes


def _decoder_layer_name(parent: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.3``: the module of the decoder layer holding an FFN."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", parent)
    if match is None:
        raise ValueError(
            f"cannot tell the decoder layer of FFN block {parent!r} (no layer index in its name)"
        )
    return match.group(1)


def with_down_routers(shape: ModelShape, share_router_with_down: bool) -> ModelShape:
    """``shape`` with every down projection's group set to ``share_router_with_down``.

    Why: a prebuilt shape records in its groups whether each down projection has a
    router of its own; without this, a plan of it would silently ignore the setting asked for.
    A layer's first group is its gate/up (or only) group, which always has its router.
    """
    layers = tuple(
        replace(
            layer,
            groups=(layer.groups[0],)
            + tuple(replace(g, own_router=not share_router_with_down) for g in layer.groups[1:]),
        )
        for layer in shape.layers
    )
    return replace(shape, layers=layers)


def model_shape(config: Any, share_router_with_down: bool = True) -> ModelShape:
    """FFN linears and parameter counts of ``config``'s model, built on the meta device (no weights).

    ``config``: a transformers ``PretrainedConfig``; ``share_router_with_down``: the
    down projections are routed by their block's router (no router of their own). Raises ``ValueError`` when the
    architecture is unknown to transformers or has no FFN linears we can expand.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_expansion_plugin.modeling.targets import ffn_blocks, weight_as_out_in

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"transformers cannot build a causal LM from this config (model_type "
            f"{getattr(config, 'model_type', '?')!r}): {error}"
        ) from None
    blocks = ffn_blocks(model)  # raises naming the known projections when there are none
    layers = []
    layer_params = 0
    for block in blocks:
        name = _decoder_layer_name(block.parent)
        params = sum(p.numel() for p in model.get_submodule(name).parameters())
        layer_params += params

        def shape(linear_name: str) -> LinearShape:
            module = model.get_submodule(linear_name)
            out_features, in_features = weight_as_out_in(module).shape
            return LinearShape(
                linear_name, int(in_features), int(out_features), getattr(module, "bias", None) is not None
            )

        groups = [RouterGroup(tuple(shape(n) for n in block.inputs))]
        if block.output is not None:
            groups.append(RouterGroup((shape(block.output),), own_router=not share_router_with_down))
        layers.append(LayerShape(block.layer_index, name, tuple(groups), params))
    total = sum(p.numel() for p in model.parameters())
    hidden = layers[0].groups[0].in_features  # the MLP's input is the residual stream
    return ModelShape(str(getattr(config, "model_type", "?")), hidden, tuple(layers), total - layer_params)


# ----------------------------------------------------------------- counts


def kept_per_expert(
    out_features: int, in_features: int, sparsity: float, prune_n: int, prune_m: int, block_size: int = 128
) -> int:
    """Weights one expert keeps under SparseGPT's rule (``pruning/sparsegpt.py``), ties aside.

    Unstructured: each block of ``block_size`` columns prunes ``int(numel * s) + 1``
    weights (llm-compressor's ``sort(...)[int(numel * s)]`` threshold, inclusive).
    N:M: ``N`` of every ``M`` consecutive columns of each block, per row.
    """
    kept = 0
    for start in range(0, in_features, block_size):
        columns = min(block_size, in_features - start)
        numel = out_features * columns
        if prune_n:
            groups = math.ceil(columns / prune_m)
            kept += numel - out_features * prune_n * groups
        else:
            kept += numel - (int(numel * float(sparsity)) + 1)
    return kept


def _linear_packed_bytes(linear: LinearShape, num_experts: int, kept: int, b: int) -> int:
    """values + bitmask ``[K, out, ceil(in/8)]`` + ``nnz [K]`` + bias, as ``ExpandedLinear`` stores them."""
    mask = num_experts * linear.out_features * ((linear.in_features + 7) // 8)
    bias = linear.out_features * b if linear.bias else 0
    return num_experts * kept * b + mask + num_experts * INDEX_BYTES + bias


def _router_bytes(group: RouterGroup, num_experts: int) -> int:
    """One folded router ``weight [K, d]`` + ``bias [K]``, float32 (``router.py``); none when shared."""
    return HOST_FLOAT * num_experts * (group.in_features + 1) if group.own_router else 0


# ----------------------------------------------------------------- phases


@dataclass(frozen=True)
class _Settings:
    num_experts: int
    expert_batch: int
    b: int
    prune_n: int
    prune_m: int
    sparsity: float
    block_size: int
    tokens: int
    fit_tokens: int | None  # tokens kept before the router fit during calibration; None: fit at compress
    batch_tokens: int
    materialize: bool
    input_norm: str = "l2"

    @property
    def fit_bytes_per_value(self) -> int:
        return FIT_BYTES_PER_VALUE + (L2_FIT_BYTES_PER_VALUE if self.input_norm == "l2" else 0)


def _layer_phases(layer: LayerShape, s: _Settings, previous_materialized: int) -> list[Phase]:
    """The moments of one layer's calibration and compression with the bytes alive at each."""
    K, E, b = s.num_experts, s.expert_batch, s.b
    groups = layer.groups
    dims = [g.in_features for g in groups]
    sums = [K * n * n * HOST_FLOAT for n in dims]  # StreamingClusterHessians._sums
    phases: list[Phase] = []
    prev = previous_materialized  # dense experts of the previous layer, released by compress_modules

    if s.fit_tokens is not None:  # each group fits in the hook once it holds fit_tokens tokens
        kept = s.fit_tokens
        for j, n in enumerate(dims):
            if not groups[j].own_router:  # routed by the block: its kept inputs wait in the terms above
                continue
            waiting = sum((kept - s.batch_tokens) * m * HOST_FLOAT for m in dims[j + 1 :])
            phases.append(
                Phase(
                    f"calibration: router fit of group {j}",
                    prev + sum(sums[:j]),
                    s.fit_bytes_per_value * kept * n + waiting,
                )
            )
        stream = max(s.batch_tokens * n * (b + HOST_FLOAT) for n in dims)  # one batch, grouped in float32
        phases.append(Phase("calibration: streaming into K Hessians", prev + sum(sums) + stream, 0))
    else:  # every input kept (float32) until compress_modules fits the routers
        phases.append(Phase("calibration: inputs kept", prev, s.tokens * sum(dims) * HOST_FLOAT))

    done = 0  # packed (and materialized) experts of this layer so far, on the device
    for j, (group, n) in enumerate(zip(groups, dims, strict=True)):
        alive_sums = sum(sums) if s.fit_tokens is not None else sum(sums[:j])
        if s.fit_tokens is None and not group.own_router:  # the block's routing drains its kept inputs
            alive_sums += sums[j]
            phases.append(
                Phase(
                    f"compress: routing the kept inputs of group {j}",
                    alive_sums + done,
                    s.tokens * n * HOST_FLOAT,
                )
            )
        elif s.fit_tokens is None:
            waiting = sum(s.tokens * m * HOST_FLOAT for m in dims[j + 1 :])
            phases.append(
                Phase(
                    f"compress: router fit of group {j}",
                    alive_sums + done,
                    s.fit_bytes_per_value * s.tokens * n + waiting,
                )
            )
            alive_sums += sums[j]
        square = n * n * HOST_FLOAT
        # ClusterHessians.result (scaled copy + global) and regularized_hessians (clone + global mean)
        phases.append(
            Phase(f"compress: Hessians of group {j}", alive_sums + done + 2 * K * square + 2 * square, 0)
        )
        base = alive_sums + done + K * square  # the regularized Hessians stay for the group's solves
        previous_pruned = 0
        for linear in group.linears:
            o = linear.out_features
            kept = kept_per_expert(o, n, s.sparsity, s.prune_n, s.prune_m, s.block_size)
            dense_one = o * n  # positions of one expert
            chunks_done = 0
            for start in range(0, K, E):
                e = min(E, K - start)
                held = base + previous_pruned + chunks_done
                w = e * dense_one * HOST_FLOAT
                h = e * square
                phases.append(Phase(f"compress: Cholesky of {linear.name} x{e}", held + w + 4 * h, 0))
                block = 4 * e * o * min(s.block_size, n) * HOST_FLOAT  # W1, Q1, Err1, saliency
                phases.append(
                    Phase(
                        f"compress: SparseGPT of {linear.name} x{e}",
                        held + h + 2 * w + e * dense_one + block,
                        0,
                    )
                )
                chunks_done += e * dense_one * (b + 1)  # pruned weights (model dtype) + bool keep mask
            phases.append(
                Phase(f"compress: experts of {linear.name}", base + previous_pruned + 2 * chunks_done, 0)
            )
            packed = _linear_packed_bytes(linear, K, kept, b)
            staging = K * dense_one * (b + 1) + packed  # pack_experts works on host copies
            phases.append(
                Phase(f"compress: packing {linear.name}", base + chunks_done + 2 * packed, 0, staging)
            )
            done += packed + (K * dense_one * b if s.materialize else 0)
            previous_pruned = chunks_done
    return phases


# ----------------------------------------------------------------- plan


def plan_expansion(
    config: Any,
    num_experts: int = 16,
    sparsity: float = 0.5,
    mask_structure: str = "0:0",
    calibration_tokens: int = 262_144,
    router_fit_tokens: int | None = 16_384,
    dtype: str = "bfloat16",
    expert_batch_size: int = 16,
    materialize_while_calibrating: bool = True,
    batch_tokens: int = 2048,
    block_size: int = 128,
    input_norm: str = "l2",
    share_router_with_down: bool = True,
) -> Plan:
    """Plan expanding every FFN linear of ``config``'s model into ``num_experts`` experts.

    config: a transformers ``PretrainedConfig`` (or a :class:`ModelShape` already built).
    calibration_tokens: tokens of the calibration set; batch_tokens: tokens per
    calibration batch (llm-compressor's ``batch_size * seq_len``). Other
    arguments as ``SparseExpansionModifier``'s fields (``share_router_with_down``:
    True plans the modifier's default, one router per MLP block; False a router of
    each down projection's own). Raises ``ValueError`` naming the bad argument.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (0.5 prunes half), got {sparsity}")
    from sparse_expansion_plugin.pruning.structure import (
        parse_mask_structure,
    )  # the package's one N:M validator

    prune_n, prune_m = parse_mask_structure(mask_structure)
    if calibration_tokens < 1:
        raise ValueError(f"calibration_tokens must be >= 1, got {calibration_tokens}")
    if router_fit_tokens is not None and router_fit_tokens < 1:
        raise ValueError(
            f"router_fit_tokens must be >= 1 or None (fit on every token), got {router_fit_tokens}"
        )
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if expert_batch_size < 1:
        raise ValueError(f"expert_batch_size must be >= 1, got {expert_batch_size}")
    if batch_tokens < 1 or block_size < 1:
        raise ValueError(f"batch_tokens and block_size must be >= 1, got {batch_tokens} and {block_size}")
    if num_experts > calibration_tokens:
        raise ValueError(
            f"num_experts={num_experts} exceeds calibration_tokens={calibration_tokens}: "
            "k-means needs at least one token per expert"
        )
    if isinstance(config, ModelShape):
        shape = with_down_routers(config, share_router_with_down)
    else:
        shape = model_shape(config, share_router_with_down)
    b = DTYPE_BYTES[dtype]
    batch_tokens = min(batch_tokens, calibration_tokens)
    fit_tokens = None
    if router_fit_tokens is not None and router_fit_tokens <= calibration_tokens:
        # the fit happens on the first batch that reaches the budget: whole batches are kept
        fit_tokens = min(calibration_tokens, math.ceil(router_fit_tokens / batch_tokens) * batch_tokens)
    settings = _Settings(
        num_experts,
        min(num_experts, expert_batch_size),
        b,
        prune_n,
        prune_m,
        sparsity,
        block_size,
        calibration_tokens,
        fit_tokens,
        batch_tokens,
        materialize_while_calibrating,
        input_norm,
    )
    density_num = density_den = 0
    layers: list[LayerPlan] = []
    host_model = (shape.other_params + sum(layer.params for layer in shape.layers)) * b
    previous_materialized = 0
    for layer in shape.layers:
        phases = _layer_phases(layer, settings, previous_materialized)
        dense_ffn = packed = semi = dense_experts = routers = transient = 0
        dense_flops = nonzero_flops = router_flops = 0
        for group in layer.groups:
            routers += _router_bytes(group, num_experts)
            router_flops += 2 * num_experts * group.in_features if group.own_router else 0
            for linear in group.linears:
                kept = kept_per_expert(
                    linear.out_features, linear.in_features, sparsity, prune_n, prune_m, block_size
                )
                density_num += kept
                density_den += linear.params
                bias = linear.out_features * b if linear.bias else 0
                dense_ffn += linear.params * b + bias
                packed += _linear_packed_bytes(linear, num_experts, kept, b)
                # torch semi-structured: half the values + 1/8 byte of metadata per position
                semi += num_experts * (linear.params // 2 * b + linear.params // 8) + bias
                dense_experts += num_experts * linear.params * b + bias
                transient = max(transient, device_unpack_bytes(num_experts, linear.params, b))
                dense_flops += 2 * linear.params
                nonzero_flops += 2 * kept
        hidden = shape.hidden_size
        widest = max(lin.out_features for g in layer.groups for lin in g.linears)
        layers.append(
            LayerPlan(
                index=layer.index,
                name=layer.name,
                phases=phases,
                layer_weight_bytes=layer.params * b,
                # one calibration batch through the layer: hidden states, attention and MLP intermediates
                pipeline_device_bytes=batch_tokens * (6 * hidden + 3 * widest) * b,
                # llm-compressor's intermediates cache: this layer's inputs and outputs of every sample
                pipeline_host_bytes=2 * calibration_tokens * hidden * b,
                host_model_bytes=host_model,
                dense_ffn_bytes=dense_ffn,
                packed_bytes=packed + routers,
                semi_structured_bytes=(semi + routers) if (prune_n, prune_m) == (2, 4) else None,
                dense_expert_bytes=dense_experts + routers,
                router_bytes=routers,
                unpack_transient_bytes=transient,
                dense_flops=dense_flops,
                routed_flops=dense_flops + router_flops,
                nonzero_flops=nonzero_flops + router_flops,
                router_flops=router_flops,
            )
        )
        # the expanded layer replaces the dense FFN on the offload device
        host_model += packed + routers - dense_ffn
        previous_materialized = (
            sum(num_experts * lin.params * b for g in layer.groups for lin in g.linears)
            if materialize_while_calibrating
            else 0
        )
    notes = []
    if router_fit_tokens is None or fit_tokens is None:
        notes.append("every calibration input is kept (float32) until the layer's routers are fitted")
    return Plan(
        model_type=shape.model_type,
        num_experts=num_experts,
        sparsity=sparsity,
        mask_structure=f"{prune_n}:{prune_m}",
        density=density_num / density_den if density_den else 0.0,
        calibration_tokens=calibration_tokens,
        router_fit_tokens=router_fit_tokens,
        dtype=dtype,
        expert_batch_size=expert_batch_size,
        materialize_while_calibrating=materialize_while_calibrating,
        batch_tokens=batch_tokens,
        layers=layers,
        other_params=shape.other_params,
        notes=notes,
    )
