"""``sparse-expansion compress MODEL --recipe R --output DIR``: run a recipe with oneshot and save.

The recipe is validated before the model is loaded (a flat or misspelt recipe
fails in a second, not after calibration). Calibration uses the package's
calibration text (disjoint from the evaluation text). The result is written to
a temporary directory next to ``DIR`` and renamed at the end, so a crash
leaves nothing half-written and an existing ``DIR`` with files in it is
replaced only with ``--overwrite``. A pruned model is saved as a plain
Hugging Face directory (dense weights with zeros; sparse formats are gone
from compressed-tensors) that reloads with
``AutoModelForCausalLM.from_pretrained``; a model with Sparse Expansion
layers is saved with ``save_expanded``. Next to the weights either way, so
the directory says exactly what produced it: ``recipe.yaml`` (the validated
recipe as given, every stage under its own name; llm-compressor's own
serialisation merges stages under the last one's name) and
``sparse_expansion_run.json`` (command line, effective seed, calibration
settings, package and library versions, every modifier's effective fields).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from sparse_expansion_plugin.commands.arguments import nonnegative_int, positive_int, sequence_length

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        help="'smollm2-135m' (embedded, default), a local HF directory, or a hub name",
    )
    parser.add_argument("--recipe", required=True, help="YAML recipe file (see recipes/)")
    parser.add_argument("--output", required=True, help="directory to write the compressed model to")
    parser.add_argument(
        "--num-calibration-samples", type=positive_int, default=32, help="calibration windows (default 32)"
    )
    parser.add_argument(
        "--seq-len", type=sequence_length, default=512, help="tokens per calibration window (default 512)"
    )
    parser.add_argument(
        "--calibration-text",
        default="python_docs,jargon_file",
        help="calibration sources, comma-separated: python_docs, jargon_file (bundled) or wikitext2, c4 (hub)",
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed for anything random in the recipe's modifiers"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")


RUN_RECORD = "sparse_expansion_run.json"
LIBRARIES = ("sparse-expansion-plugin", "llmcompressor", "compressed-tensors", "transformers", "torch")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_record(
    args: argparse.Namespace, location: Path | str, recipe: Any, sources: list[str], seconds: float
) -> dict[str, Any]:
    """What produced a compressed directory: written as ``sparse_expansion_run.json`` beside the weights.

    ``recipe`` is the instantiated ``Recipe``; its modifiers' fields are
    recorded with their defaults filled in (what ran, not only what was written).
    """
    modifiers = [
        {
            "type": type(m).__name__,
            "group": getattr(m, "group", None),
            "fields": {
                k: v for k, v in m.model_dump().items() if not k.endswith("_") and k not in ("index", "group")
            },
        }
        for m in recipe.modifiers
    ]
    return {
        "command": "compress",
        "argv": ["sparse-expansion", *sys.argv[1:]],
        "model": str(args.model),
        "model_location": str(location),
        "recipe_file": str(Path(args.recipe).absolute()) if Path(args.recipe).is_file() else None,
        "seed": args.seed,
        "calibration": {
            "num_samples": args.num_calibration_samples,
            "seq_len": args.seq_len,
            "sources": sources,
            "split": "calibration",
        },
        "versions": _versions(),
        "modifiers": modifiers,
        "oneshot_seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _write_provenance(target: Path, recipe_dict: dict[str, Any], record: dict[str, Any]) -> None:
    header = (
        f"# Recipe run by `sparse-expansion compress` with --seed {record['seed']} "
        f"(torch's global seed before oneshot; a modifier's own `seed` field is its own).\n"
        f"# Full provenance (command line, calibration, versions): {RUN_RECORD}\n"
    )
    (target / "recipe.yaml").write_text(header + yaml.safe_dump(recipe_dict, sort_keys=False))
    (target / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _save(model, tokenizer, recipe_dict: dict[str, Any], record: dict[str, Any], staging: Path) -> Path:
    """Write the model, tokenizer, recipe and run record into ``staging/model``; return that path.

    The one place that knows about expanded models: everything else is a plain
    ``save_pretrained`` of the class's own method (not llm-compressor's wrapper,
    which rewrites config.json from the original model).
    """
    from sparse_expansion_plugin.outputs import write_marker

    target = staging / "model"
    expanded = False
    try:
        from sparse_expansion_plugin.sparse_expansion.layer import is_expanded

        expanded = is_expanded(model)
    except ImportError:  # pragma: no cover - modeling package unavailable
        expanded = False
    if expanded:
        from sparse_expansion_plugin.sparse_expansion.model import save_expanded

        save_expanded(model, tokenizer, target)
    else:
        type(model).save_pretrained(model, target)
        tokenizer.save_pretrained(target)
    _write_provenance(target, recipe_dict, record)
    write_marker(target, command="compress")
    return target


def zero_count(model: Any) -> tuple[int, int, int]:
    """``(zeros, weights, layers)`` over every linear but ``lm_head``, counting each expert of an
    expanded linear (its packed values hold the kept weights; every other position is a zero)."""
    import torch

    from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear

    zeros = total = layers = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, ExpandedLinear):
            positions = module.num_experts * module.in_features * module.out_features
            zeros += positions - int(torch.count_nonzero(module.values))
        elif isinstance(module, torch.nn.Linear):
            positions = module.weight.numel()
            zeros += int((module.weight == 0).sum())
        else:
            continue
        total += positions
        layers += 1
    return zeros, total, layers


def run(args: argparse.Namespace) -> int:

    from sparse_expansion_plugin.compression import run_oneshot
    from sparse_expansion_plugin.data.locations import checked_model_location
    from sparse_expansion_plugin.data.models import load_model_and_tokenizer
    from sparse_expansion_plugin.data.text import HUB_DATASETS, SOURCES
    from sparse_expansion_plugin.evaluation.task_docs import parse_sources
    from sparse_expansion_plugin.modifiers.recipes import load_recipe, validated_recipe_dict
    from sparse_expansion_plugin.outputs import check_output_dir, publish_dir, staging_dir

    output = check_output_dir(args.output, args.overwrite, [args.model])
    recipe_dict = validated_recipe_dict(args.recipe)
    recipe = load_recipe(recipe_dict)
    logger.info("recipe %s: %s", args.recipe, ", ".join(type(m).__name__ for m in recipe.modifiers))
    sources = list(parse_sources(args.calibration_text))
    unknown = [s for s in sources if s not in SOURCES and s not in HUB_DATASETS]
    if unknown:
        raise ValueError(
            f"--calibration-text: unknown source(s) {unknown}; choose from {', '.join(SOURCES + tuple(HUB_DATASETS))}"
        )
    location = checked_model_location(args.model, args.seq_len)

    model, tokenizer = load_model_and_tokenizer(location)
    seconds = run_oneshot(
        model, tokenizer, recipe, args.num_calibration_samples, args.seq_len, args.seed, tuple(sources)
    )
    logger.info("oneshot took %.1f s", seconds)
    record = run_record(args, location, recipe, sources, seconds)

    with staging_dir(output) as staging:
        # Checked before calibration; checked again now, as an output may have appeared since.
        check_output_dir(output, args.overwrite, [args.model])
        publish_dir(_save(model, tokenizer, recipe_dict, record, staging), output, replace=args.overwrite)
    zeros, total, layers = zero_count(model)
    logger.info("saved %s (%.2f%% zeros in %d linear layers)", output, 100 * zeros / max(total, 1), layers)
    print(output)
    return 0
