"""WassersteinSparseGPTModifier: SparseGPT that spends its zeros away from entangled neurons.

The modifier is llm-compressor's ``SparseGPTModifier`` plus a score per output
row (a neuron) measured in the same calibration hooks that accumulate the
Hessian, and a rule that turns scores into where the zeros go. The maths lives
in :mod:`sparse_expansion_plugin.pruning.sparsegpt` (solver) and
:mod:`sparse_expansion_plugin.wd_sparsegpt.allocation` (how many zeros where).

What "WD-aware" means, by mode:

* ``allocation: rows`` (default). Each row's SparseGPT saliency is multiplied by
  ``exp(wd_strength * rank)``, ``rank`` in ``[-1, 1]`` from the row's score
  within its layer. This is SparseGPT on the weighted objective
  ``sum_r w_r ||dy_r||^2``: every block of 128 columns still loses exactly the
  stock number of weights (so the module and model totals equal uniform
  SparseGPT's), but entangled rows lose fewer and Gaussian rows more.
* ``allocation: layers``. A dense pre-pass over the calibration data scores
  every decoder layer (mean row score, or OWL's outlier ratio) and OWL's rule
  sets each layer's sparsity within ``sparsity +- max_layer_shift``; integer
  budgets per module then sum to exactly uniform SparseGPT's total zeros.
* ``allocation: both``: layer budgets, and row weights inside each module.
* N:M (``mask_structure: "2:4"``): every group of M loses exactly N weights,
  so neither rows nor layers can take fewer zeros without breaking the pattern
  or the total. WD-awareness there decides *which* weights survive inside each
  group: the saliency of input column ``j`` is multiplied by
  ``exp(wd_strength * rank_j)`` of the score of the layer's *input* feature
  ``j`` (for ``down_proj``: the MLP's own intermediate neurons), protecting
  connections that carry entangled signals. The N:M pattern stays exact.

Measured on SmolLM2-135M (``benchmarks/wd_sparsegpt_quality.py``, README, token
perplexity against stock SparseGPT at equal zeros): at ``wd_strength: 1`` row
allocation hurts (+6.6% at 50%, +32% at 70%); at the default ``0.25`` it helps a
little at 50% (-2.0%) and still hurts at 70% (+2.5%). The README has the controls
(random, kurtosis, variance, OWL scores) that say whether WD itself is what
helps. Moving zeros off SparseGPT's own saliency order costs about as much as
protecting high-WD rows gains; treat the modifier as the tool for that
experiment, not as a guaranteed improvement.

``wd_strength: 0`` calls the stock code path and reproduces
``SparseGPTModifier`` exactly. Row scores come from the inputs the sequential
pipeline feeds each layer (upstream already pruned), as the Hessian does.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from compressed_tensors.utils import (
    align_module_device,
    match_named_modules,
    match_targets,
    update_offload_parameter,
)
from llmcompressor.core import Event, State
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES
from pydantic import Field, PrivateAttr, field_validator, model_validator

from sparse_expansion_plugin.analysis.hooks import hooks_attached, run_batches
from sparse_expansion_plugin.modeling.targets import module_weight
from sparse_expansion_plugin.modifiers import register_modifier
from sparse_expansion_plugin.pruning.sparsegpt import sparsegpt_prune
from sparse_expansion_plugin.pruning.structure import check_sparsity, normalized_mask_structure
from sparse_expansion_plugin.wd_sparsegpt import allocation
from sparse_expansion_plugin.wd_sparsegpt.statistics import STATISTIC_SCORES, ScoreStatistics

logger = logging.getLogger(__name__)

__all__ = ["WassersteinSparseGPTModifier"]

SCORES = ("wd", "kurtosis", "variance", "owl", "random")
ALLOCATIONS = ("rows", "layers", "both")


class WassersteinSparseGPTModifier(SparseGPTModifier):
    """SparseGPT with zeros moved away from high-WD (entangled) rows, at equal total zeros.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        WassersteinSparseGPTModifier:
          sparsity: 0.7
          mask_structure: "0:0"
          wd_strength: 0.25
          allocation: rows
          score: wd
          targets: ['Linear']
          ignore: ['re:.*lm_head']
    ```

    :param sparsity: fraction of weights to prune, in [0, 1) (one float).
    :param wd_strength: how strongly scores move zeros; 0 reproduces stock
        SparseGPT exactly. Row saliency weights span ``[e^-s, e^s]``. Default 0.25:
        the best of {0.25, 1} measured on SmolLM2 (1 clearly over-moves zeros).
    :param allocation: ``rows`` (weights inside each module), ``layers`` (OWL
        rule across decoder layers, dense pre-pass) or ``both``.
    :param score: what ranks rows/layers: ``wd`` (Wasserstein distance to a
        Gaussian), and the controls ``kurtosis``, ``variance``, ``owl`` (OWL's
        ``|W| * ||x||`` outliers) and ``random`` (seeded).
    :param max_layer_shift: layer sparsities stay within ``sparsity +- this``
        (OWL's lambda).
    :param owl_threshold: OWL's M: an outlier is ``|W_ij| ||x_j|| > M * mean``.
    :param wd_bins: histogram bins of the streaming WD (accuracy vs time).
    :param wd_token_stride: score every k-th calibration token (rotating
        offset); SparseGPT's Hessian still sees every token.
    :param seed: seed of the ``random`` score.
    """

    sparsity: float = 0.5
    wd_strength: float = Field(default=0.25, ge=0.0)
    allocation: Literal["rows", "layers", "both"] = "rows"
    score: Literal["wd", "kurtosis", "variance", "owl", "random"] = "wd"
    max_layer_shift: float = Field(default=0.05, ge=0.0, lt=0.5)
    owl_threshold: float = Field(default=5.0, gt=0.0)
    wd_bins: int = Field(default=128, ge=8)
    wd_token_stride: int = Field(default=8, ge=1)
    seed: int = 0

    _row_stats: ScoreStatistics | None = PrivateAttr(default=None)
    _layer_sparsity: dict[str, float] = PrivateAttr(default_factory=dict)
    _zero_budgets: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _model: torch.nn.Module | None = PrivateAttr(default=None)
    _decoder_layer_names: list[str] = PrivateAttr(default_factory=list)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _check_sparsity(cls, value: object) -> float:
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(
                "WassersteinSparseGPTModifier takes one float sparsity in [0, 1); per-layer "
                "sparsities come from `allocation: layers`"
            )
        return check_sparsity(value)

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _check_mask_structure(cls, value: object) -> str:
        return normalized_mask_structure(value)

    @field_validator("sparsity_profile", mode="before")
    @classmethod
    def _no_upstream_profile(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "sparsity_profile is not supported (upstream 'owl' is broken in llm-compressor 0.14); "
                "use `allocation: layers` with `score: owl` for OWL layer sparsities"
            )
        return None

    @model_validator(mode="after")
    def _check_combination(self) -> WassersteinSparseGPTModifier:
        if self.preserve_sparsity_mask and self.wd_strength > 0:
            raise ValueError("preserve_sparsity_mask works only with wd_strength: 0 (the stock path)")
        return self

    # ------------------------------------------------------------------ lifecycle
    @property
    def _active(self) -> bool:
        return self.wd_strength > 0

    @property
    def _structured(self) -> bool:
        return bool(self._prune_n)

    def on_initialize(self, state: State, **kwargs) -> bool:
        result = super().on_initialize(state, **kwargs)
        self._check_targets_match(state.model)
        self._model = state.model
        self._decoder_layer_names = [n for n, _ in match_named_modules(state.model, self._sequential_targets)]
        if self._active and not self._structured and self.allocation in ("layers", "both"):
            self._layer_sparsity = self._layer_sparsities_from_prepass(state)
        return result

    def on_calibration_start(self, state: State, event: Event, **kwargs) -> None:
        super().on_calibration_start(state, event, **kwargs)
        if self._active and self._layer_sparsity:
            self._zero_budgets = self._exact_layer_budgets()

    def calibrate_module(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ):
        """Accumulate the Hessian (stock) and, when active, this module's row or column statistics."""
        super().calibrate_module(module, args, _output)
        if not self._active or self.score in ("owl", "random"):
            return  # owl uses the Hessian diagonal, random needs nothing
        if self._structured:
            values = args[0]  # N:M: score the input features (columns)
        elif self.allocation in ("rows", "both"):
            values = _output
        else:
            return
        if self._row_stats is None:
            self._row_stats = ScoreStatistics(self.score, self.wd_token_stride, self.wd_bins)
        self._row_stats.update(module, values)

    def compress_modules(self) -> None:
        if not self._active:
            super().compress_modules()
            return
        for module in list(self._num_samples.keys()):
            self._compress_one(module)

    def on_finalize(self, state: State, **kwargs) -> bool:
        result = super().on_finalize(state, **kwargs)
        self._row_stats = None
        self._zero_budgets = {}
        self._model = None
        return result

    def _check_targets_match(self, model: torch.nn.Module) -> None:
        """Refuse targets/ignore that leave nothing to prune (upstream would save the model unpruned, exit 0)."""
        if self._prunable_modules():
            return
        linears = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        found = (
            f"matched {len(self._target_layers)} module(s) but leave no Linear to prune after ignore {self.ignore}"
            if self._target_layers
            else "matched no module"
        )
        raise ValueError(
            f"WassersteinSparseGPTModifier targets {self.targets} {found}: nothing would be pruned. "
            "targets take class names ('Linear'), full module names or 're:' regexes "
            f"(e.g. 're:.*mlp\\.down_proj$'); Linear leaves here: {', '.join(linears) or 'none'}. "
            "The usual recipe is `targets: ['Linear']` with `ignore: ['re:.*lm_head']`; with targets "
            "['Linear'] module names carry a trailing '.', so only unanchored ignore regexes match."
        )

    # ------------------------------------------------------------------ statistics
    def _scores(self, module: torch.nn.Module, hessian: torch.Tensor, index: int) -> torch.Tensor:
        """Score per row (unstructured) or per input column (N:M) of one module: ``[out]`` or ``[in]``."""
        shape = module_weight(module).shape
        size = shape[1] if self._structured else shape[0]
        if self.score == "random":
            generator = torch.Generator().manual_seed(self.seed * 100003 + index)
            return torch.rand(size, generator=generator)
        if self.score == "owl":
            # ||x_j||^2 is proportional to the Hessian diagonal (H = 2/N sum x x^T).
            outliers = allocation.owl_outlier_scores(module_weight(module), hessian.diagonal())
            return allocation.owl_outlier_share(
                outliers, self.owl_threshold, dim=0 if self._structured else 1
            )
        if self._row_stats is None:
            raise RuntimeError(f"no calibration statistics were collected for {self._module_names[module]}")
        return self._row_stats.pop(module, self._module_names[module])

    # ------------------------------------------------------------------ pruning
    def _compress_one(self, module: torch.nn.Module) -> None:
        name = self._module_names[module]
        index = list(self._module_names).index(module)
        hessian = self._hessians.pop(module)
        num_samples = self._num_samples.pop(module)
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"{name}: WassersteinSparseGPTModifier prunes Linear modules only; "
                f"got {type(module).__name__} (add it to `ignore`)"
            )
        kwargs: dict[str, object] = {}
        sparsity: float = self.sparsity
        if self._structured:
            kwargs["column_weight"] = allocation.row_saliency_weights(
                self._scores(module, hessian, index), self.wd_strength
            )
        else:
            if self.allocation in ("rows", "both"):
                kwargs["row_weight"] = allocation.row_saliency_weights(
                    self._scores(module, hessian, index), self.wd_strength
                )
            if module in self._zero_budgets:
                kwargs["num_zeros"] = self._zero_budgets.pop(module)
        with torch.no_grad(), align_module_device(module):
            pruned, keep = sparsegpt_prune(
                module.weight,
                hessian,
                sparsity,
                self._prune_n or 0,
                self._prune_m or 0,
                self.block_size,
                self.dampening_frac or 0.0,
                **kwargs,  # type: ignore[arg-type]
            )
            row_sparsity = (~keep).float().mean(dim=1)
        update_offload_parameter(module, "weight", pruned)
        logger.info(
            "WD-aware SparseGPT %s (%d samples, score %s): sparsity %.4f, rows %.3f..%.3f",
            name,
            num_samples,
            self.score,
            float(row_sparsity.mean()),
            float(row_sparsity.min()),
            float(row_sparsity.max()),
        )

    # ------------------------------------------------------------------ layer allocation
    def _prunable_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The (name, module) pairs ``on_calibration_start`` will hook, in the same order."""
        found = []
        for layer_name, layer in self._target_layers.items():
            for name, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
                name = f"{layer_name}.{name}"
                if match_targets(name, module, self.ignore) or isinstance(module, torch.nn.Embedding):
                    continue
                found.append((name, module))
        return found

    def _layer_of(self, name: str) -> str:
        """Name of the decoder layer (sequential target) holding a module; the module's own name if none."""
        for layer_name in self._decoder_layer_names:
            if name.startswith(layer_name + "."):
                return layer_name
        return name

    def _layer_sparsities_from_prepass(self, state: State) -> dict[str, float]:
        """One dense forward over the calibration data, scoring each decoder layer (as OWL does)."""
        from compressed_tensors.utils import get_execution_device
        from llmcompressor.utils import calibration_forward_context

        model = state.model
        modules = self._prunable_modules()
        stats = (
            ScoreStatistics(self.score, self.wd_token_stride, self.wd_bins)
            if self.score in STATISTIC_SCORES
            else None
        )
        sq_sums: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if stats is not None:
                    stats.update(name, output)
                    return
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sq_sums[name] = sq_sums.get(name, 0) + (x * x).sum(dim=0)

            return hook

        if self.score != "random":
            dataloader = state.data.calib
            if dataloader is None:
                raise ValueError("allocation: layers needs calibration data for its dense pre-pass")
            with (
                hooks_attached((module, hook_for(name)) for name, module in modules),
                calibration_forward_context(model),
            ):
                run_batches(
                    model,
                    dataloader,
                    f"layer scores ({self.score}, dense pre-pass)",
                    device=get_execution_device(model),
                )

        per_layer: dict[str, list[torch.Tensor]] = {}
        owl_members: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        generator = torch.Generator().manual_seed(self.seed)
        for name, module in modules:
            layer = self._layer_of(name)
            if self.score == "owl":
                owl_members.setdefault(layer, []).append((module_weight(module), sq_sums[name]))
                continue
            value = torch.rand(1, generator=generator) if stats is None else stats.pop(name, name)
            per_layer.setdefault(layer, []).append(value.flatten())
        if self.score == "owl":
            scores = {
                layer: allocation.owl_layer_outlier_ratio(members, self.owl_threshold)
                for layer, members in owl_members.items()
            }
        else:
            scores = {layer: float(torch.cat(values).mean()) for layer, values in per_layer.items()}
        sparsities = allocation.owl_layer_sparsities(scores, self.sparsity, self.max_layer_shift)
        for layer in scores:
            logger.info(
                "layer %s: %s score %.4g -> sparsity %.4f",
                layer,
                self.score,
                scores[layer],
                sparsities[layer],
            )
        return sparsities

    def _exact_layer_budgets(self) -> dict[torch.nn.Module, int]:
        """Integer zeros per module: layer sparsities, rescaled to uniform SparseGPT's exact total."""
        modules = list(self._module_names.items())
        shapes = [module_weight(m).shape for m, _ in modules]
        sizes = [shape.numel() for shape in shapes]
        total = sum(
            allocation.stock_zero_count(shape[0], shape[1], self.sparsity, self.block_size)
            for shape in shapes
        )
        fractions = [self._layer_sparsity.get(self._layer_of(name), self.sparsity) for _, name in modules]
        budgets = allocation.exact_zero_budgets(sizes, fractions, total)
        logger.info(
            "layer allocation: %d zeros in %d modules (uniform SparseGPT's exact total)", total, len(modules)
        )
        return {m: b for (m, _), b in zip(modules, budgets, strict=True)}


register_modifier(
    "WassersteinSparseGPTModifier", WassersteinSparseGPTModifier
)  # recipes can name it (see modifiers/__init__.py)
