"""``sparse-expansion plan MODEL_OR_CONFIG``: memory and FLOPs of a Sparse Expansion run, from config.json alone.

Why a command: whether K experts of a model fit a GPU (compression) or a machine
(the expanded model) was only learnt hours into a run. This reads the model's
``config.json`` (a local directory, a config file, or a hub name fetched with
``huggingface_hub``), builds the model on the meta device (no weights) and prints
the plan of ``sparse_expansion/plan.py``: per layer and in total, the compression
peaks on the GPU and the host, inference bytes (packed, semi-structured 2:4,
dense experts), FLOPs per token, and whether it fits ``--gpu-memory``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from sparse_expansion_plugin.commands.arguments import positive_int, sparsity

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
DTYPES = ("bfloat16", "float16", "float32")
SHOWN_LAYERS = 2  # first and last layers shown when a model has more than 2 * SHOWN_LAYERS + 1


def memory_size(text: str) -> int:
    """Bytes of ``80GB`` (10^9), ``80GiB`` (2^30), ``141g``, ``8e10``: argparse type, exits 2 on a bad size."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a size such as 80GB, 80GiB or 141e9, got {text!r}")
    unit = (match.group(2) or "").lower()
    scale = _UNITS[unit[0] if unit else ""]
    if "i" in unit:
        scale = 2 ** (10 * "bkmgt".index(unit[0]))
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return value


def fit_tokens(text: str) -> int | None:
    """``--router-fit-tokens``: a positive count, or ``all`` / ``none`` (keep every token to fit on)."""
    if text.strip().lower() in ("all", "none"):
        return None
    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a model directory, a config.json file, or a hub name (only config.json is fetched)",
    )
    parser.add_argument("--experts", type=positive_int, default=16, help="experts per linear, K (default 16)")
    parser.add_argument(
        "--sparsity", type=sparsity, default=0.5, help="fraction of zeros per expert (default 0.5)"
    )
    parser.add_argument(
        "--mask-structure", default="0:0", help="'N:M' structured pruning, '0:0' unstructured (default)"
    )
    parser.add_argument(
        "--calibration-tokens", type=positive_int, default=262_144, help="calibration tokens (default 262144)"
    )
    parser.add_argument(
        "--router-fit-tokens",
        type=fit_tokens,
        default=16_384,
        help="tokens kept to fit each router, then streamed; 'all' keeps every input (default 16384)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="model dtype (default bfloat16)")
    parser.add_argument(
        "--gpu-memory", type=memory_size, default=None, help="memory of one GPU, e.g. 80GB or 141GiB"
    )
    parser.add_argument(
        "--expert-batch-size", type=positive_int, default=16, help="experts solved at once (default 16)"
    )
    parser.add_argument(
        "--batch-tokens", type=positive_int, default=2048, help="tokens per calibration batch (default 2048)"
    )
    parser.add_argument(
        "--no-materialize",
        action="store_true",
        help="plan materialize_while_calibrating: false (no dense expert copies while calibrating)",
    )
    parser.add_argument(
        "--own-down-router",
        action="store_true",
        help="plan share_router_with_down: false (each down projection fits a router of its own); "
        "default: the modifier's, one router per MLP block",
    )
    parser.add_argument("--all-layers", action="store_true", help="print every layer, not the first and last")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan's rows as JSON here")


def read_model_config(model: str) -> dict[str, Any]:
    """``config.json`` of a directory, a config file, or a hub name (huggingface_hub) as a dict."""
    from sparse_expansion_plugin.data.locations import ModelLocationError, looks_like_hub_id, read_config

    path = Path(model).expanduser()
    if path.is_dir():
        return read_config(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable JSON config ({error})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"{path} is not a model config.json (no 'model_type')")
        return data
    if not looks_like_hub_id(model):
        raise FileNotFoundError(
            f"{model!r} does not exist; give a model directory, a config.json file or a hub name such as "
            "EleutherAI/pythia-1.4b"
        )
    try:
        from huggingface_hub import hf_hub_download

        downloaded = hf_hub_download(model, "config.json")
    except Exception as error:  # offline, unknown repo, gated: one line instead of a traceback
        raise ModelLocationError(
            f"could not fetch config.json of hub model {model!r} ({type(error).__name__}: {error}); "
            "without network, pass a local directory or config.json file"
        ) from None
    return read_config(Path(downloaded).parent)


def transformers_config(data: dict[str, Any]) -> Any:
    """A transformers config object of ``config.json``'s dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no 'model_type'; cannot tell the architecture")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as error:
        raise ValueError(f"transformers does not know model_type {model_type!r}: {error}") from None


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:,.2f}"


def _flops(value: int) -> str:
    return f"{value / 1e9:,.3f}" if value >= 1e7 else f"{value / 1e6:,.3f}M"


def layer_table(plan: Any, all_layers: bool) -> list[str]:
    """Markdown rows: per layer, compression peaks (and the phase of the GPU one) and inference bytes."""
    lines = [
        "| layer | GPU peak | at | CPU peak | packed | semi-structured | dense experts | GFLOPs/token dense / routed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    layers = plan.layers
    shown = layers
    if not all_layers and len(layers) > 2 * SHOWN_LAYERS + 1:
        shown = [*layers[:SHOWN_LAYERS], None, *layers[-SHOWN_LAYERS:]]
    for layer in shown:
        if layer is None:
            lines.append(f"| ... ({len(layers) - 2 * SHOWN_LAYERS} more) | | | | | | | |")
            continue
        lines.append(
            f"| {layer.index} | {_gib(layer.gpu_peak_bytes)} | {layer.device_peak_phase.name.split(': ', 1)[-1]} "
            f"| {_gib(layer.cpu_peak_bytes)} | {_gib(layer.packed_bytes)} | {_gib(layer.semi_structured_bytes)} "
            f"| {_gib(layer.dense_expert_bytes)} | {_flops(layer.dense_flops)} / {_flops(layer.routed_flops)} |"
        )
    return lines


def totals_table(plan: Any) -> list[str]:
    """Markdown rows of the whole model's figures."""
    last = plan.layers[-1]
    rows = [
        ("dense model weights", _gib(plan.dense_model_bytes)),
        ("compression peak, GPU (one layer onloaded)", _gib(plan.gpu_peak_bytes)),
        ("compression peak, CPU (offloaded model + kept inputs)", _gib(plan.cpu_peak_bytes)),
        ("  of which the offloaded model at the last layer", _gib(last.host_model_bytes)),
        (
            "  of which kept inputs, router fit, packing staging (largest)",
            _gib(max(x.host_peak_phase.host + x.host_peak_phase.host_staging for x in plan.layers)),
        ),
        ("  of which the pipeline's activation cache (estimate)", _gib(last.pipeline_host_bytes)),
        ("expanded model, packed experts", _gib(plan.packed_model_bytes)),
        ("  + one linear's experts unpacked per call on a GPU (largest)", _gib(plan.unpack_transient_bytes)),
        ("expanded model, semi-structured 2:4 (CUDA)", _gib(plan.semi_structured_model_bytes)),
        ("expanded model, dense expert copies", _gib(plan.dense_experts_model_bytes)),
        ("FFN GFLOPs/token dense", _flops(sum(x.dense_flops for x in plan.layers))),
        (
            "FFN GFLOPs/token routed (dense kernel + routers)",
            _flops(sum(x.routed_flops for x in plan.layers)),
        ),
        ("FFN GFLOPs/token routed, non-zeros only", _flops(sum(x.nonzero_flops for x in plan.layers))),
    ]
    return [
        "| total | GiB (FLOPs as labelled) |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]


def run(args: argparse.Namespace) -> int:
    from sparse_expansion_plugin.sparse_expansion.plan import plan_expansion

    data = read_model_config(args.model)
    plan = plan_expansion(
        transformers_config(data),
        num_experts=args.experts,
        sparsity=args.sparsity,
        mask_structure=args.mask_structure,
        calibration_tokens=args.calibration_tokens,
        router_fit_tokens=args.router_fit_tokens,
        dtype=args.dtype,
        expert_batch_size=args.expert_batch_size,
        materialize_while_calibrating=not args.no_materialize,
        batch_tokens=args.batch_tokens,
        share_router_with_down=not args.own_down_router,
    )
    print(
        f"Sparse Expansion plan: {args.model} ({plan.model_type}, {len(plan.layers)} layers), K={plan.num_experts}, "
        f"sparsity {plan.sparsity:g} ({plan.mask_structure}, density {plan.density:.3f}), {plan.dtype}, "
        f"{plan.calibration_tokens:,} calibration tokens, router fit on "
        f"{plan.router_fit_tokens if plan.router_fit_tokens is not None else 'all'} tokens, "
        f"expert batch {plan.expert_batch_size}, materialize while calibrating: "
        f"{'yes' if plan.materialize_while_calibrating else 'no'}, down projections routed by "
        f"{'their own routers' if args.own_down_router else 'the block router'}. GiB = 2^30 bytes.\n"
    )
    print("\n".join(layer_table(plan, args.all_layers)))
    print()
    print("\n".join(totals_table(plan)))
    for note in plan.notes:
        print(f"note: {note}")
    if args.gpu_memory is not None:
        budget = args.gpu_memory
        answers = [f"compression {'yes' if plan.fits(budget) else 'no'}"]
        for storage in ("packed", "semi_structured", "dense"):
            fits = plan.inference_fits(budget, storage)
            if fits is not None:
                answers.append(f"inference {storage.replace('_', '-')} {'yes' if fits else 'no'}")
        print(f"\nfits in --gpu-memory ({budget / 2**30:,.1f} GiB): " + "; ".join(answers))
    if args.json is not None:
        rows = [
            {
                "layer": x.index,
                "gpu_peak_bytes": x.gpu_peak_bytes,
                "gpu_peak_phase": x.device_peak_phase.name,
                "cpu_peak_bytes": x.cpu_peak_bytes,
                "packed_bytes": x.packed_bytes,
                "semi_structured_bytes": x.semi_structured_bytes,
                "dense_expert_bytes": x.dense_expert_bytes,
                "unpack_transient_bytes": x.unpack_transient_bytes,
                "dense_flops": x.dense_flops,
                "routed_flops": x.routed_flops,
                "nonzero_flops": x.nonzero_flops,
            }
            for x in plan.layers
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
