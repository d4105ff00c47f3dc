"""Sparse Expansion quality on a real model (default: the embedded SmolLM2-135M).

Token perplexity (the package's ``token_perplexity``) on held-out evaluation
windows for: dense, stock SparseGPT (MLP linears only, as Sparse Expansion),
Sparse Expansion with K experts, and the controls reviewers asked for: the same
experts with random routing, and a memory-matched Sparse Expansion (each expert
at sparsity ``1 - (1 - s) / K``, so K experts store as many non-zeros as one
SparseGPT layer). Also the papers' check that clusters make Wasserstein
neurons more Gaussian: the token-share weighted WD of the top-1% WD gate
neurons within the router's clusters, against the same neurons over all
tokens and within random partitions of the same sizes (small samples have a
larger WD by themselves, so the random partition is the fair reference).

Variants are named on the command line:
  dense | sparsegpt | sparsegpt-2:4 | wanda | wanda-2:4 (llm-compressor's WandaPruningModifier) |
  se:K | se:K:2:4 | se:K@S (sparsity S) |
  random:K (random routing of the se:K experts) | wd:K (WD check with se:K's routers) |
  time:K (forward time of se:K on 8 x seq_len tokens / dense, compact and materialized experts;
  benchmarks/sparse_expansion_speed.py is the full speed benchmark)
  and, for levers, se:K+field=value+field=value (extra SparseExpansionModifier fields for this run only)

    flock /tmp/heavy.lock python benchmarks/sparse_expansion_quality.py \
        --calibration-samples 64 --eval-seq-lens 512 2048 --seed 0 \
        --variants dense sparsegpt se:1 se:2 se:4 se:8 se:16 random:16 wd:16 se:2@0.75 \
        --output bench-se/quality.json

Seeds: ``--seed`` draws the calibration windows at random (seeded) from the
whole calibration split (about 1,000 windows of 512 tokens of both texts), so
each seed calibrates every method on different text; it also seeds k-means and
the order ``oneshot`` shuffles samples in. ``--calibration-draw first`` takes the
first windows instead (the demo's choice). With ``--calibration-samples`` equal to
the split's window count (1,004 at 512 tokens) every seed calibrates on the same
text, so seeds then differ only in k-means and in the shuffle order, which decides
the tokens the router is fitted on. The evaluation windows are the
first of the evaluation split, disjoint from all calibration text, the same for
every seed, scored per text at each ``--eval-seq-lens`` (``--eval-tokens``
tokens per text at each length).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import median_forward_seconds, peak_rss_gib

from sparse_expansion_plugin.compression import release_weights, run_oneshot
from sparse_expansion_plugin.data.calibration import calibration_dataset
from sparse_expansion_plugin.data.models import load_model_and_tokenizer
from sparse_expansion_plugin.data.text import SOURCES, token_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity
from sparse_expansion_plugin.outputs import atomic_write_text
from sparse_expansion_plugin.pruning.structure import check_sparsity, normalized_mask_structure

MLP_TARGETS = [r"re:.*mlp\.(gate|up|down)_proj$"]
logger = logging.getLogger("sparse_expansion_quality")


def seeded_calibration(tokenizer: Any, num_samples: int, seq_len: int, seed: int, draw: str) -> Any:
    """``num_samples`` calibration windows: the first ones, or a seeded random draw from the whole split."""
    from datasets import Dataset

    if draw == "first":
        return calibration_dataset(tokenizer, num_samples, seq_len)
    windows = token_windows(tokenizer, "calibration", seq_len, None)
    if num_samples > len(windows):
        raise SystemExit(
            f"--calibration-samples {num_samples} but the calibration split holds {len(windows)}"
        )
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:num_samples]
    ids = windows[pick.sort().values].tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in ids]})


# Arguments that may differ between a run and the one it resumes: they choose which rows run and where
# they go, not what any row measures.
RESUME_FREE_ARGS = frozenset({"variants", "output", "resume"})


def recorded_args(args: argparse.Namespace) -> dict[str, str]:
    """The arguments as a results file records them (and as ``--resume`` compares them): text."""
    return {key: str(value) for key, value in vars(args).items()}


def rows_to_resume(output: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows already in ``output``, if it was written with the same measuring arguments as ``args``.

    Resuming a file written with another seed, calibration size or evaluation setup would put rows that
    measured different things into one table, and nothing downstream could tell; so refuse, and say
    which argument differs.
    """
    stored = json.loads(output.read_text())
    differ = {
        key: (stored["args"].get(key, "<absent>"), value)
        for key, value in recorded_args(args).items()
        if key not in RESUME_FREE_ARGS and stored["args"].get(key) != value
    }
    if differ:
        listed = "; ".join(
            f"--{k.replace('_', '-')}: file {old}, now {new}" for k, (old, new) in differ.items()
        )
        raise SystemExit(
            f"--resume: {output} was written with other arguments ({listed}). Rerun with the file's "
            "arguments, or write to another --output."
        )
    return list(stored["results"])


REUSING_KINDS = ("random", "time", "wd")
"""Variant kinds that reuse the model of an earlier ``se:K`` row instead of compressing their own."""
PRUNING_KINDS = ("sparsegpt", "wanda")


@dataclass(frozen=True)
class Variant:
    """One ``--variants`` entry, parsed once so the checks before the run and the run itself agree.

    ``dense``; ``sparsegpt[-N:M]`` / ``wanda[-N:M]``; ``se:K[:N:M][@S][+field=value...]``;
    ``random:K`` / ``time:K`` / ``wd:K`` (reuse the model of an earlier plain ``se:K``).
    """

    name: str
    kind: str
    num_experts: int = 0
    """K of ``se:K`` and of the ``se:K`` a reusing variant needs; 0 for dense and pruning rows."""
    mask_structure: str = "0:0"
    sparsity: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def reusable(self) -> bool:
        """A plain ``se:K`` (default structure, sparsity and options): the model ``random:K`` etc. mean."""
        return (
            self.kind == "se" and self.mask_structure == "0:0" and self.sparsity is None and not self.options
        )


def parse_variant(name: str) -> Variant:
    """Parse one variant name; a name the script does not know fails here, before any model is loaded."""
    try:
        base, *extras = name.split("+")
        if base == "dense" and not extras:
            return Variant(name, "dense")
        method, dash, structure = base.partition("-")
        if method in PRUNING_KINDS and not extras:
            return Variant(
                name, method, mask_structure=normalized_mask_structure(structure) if dash else "0:0"
            )
        kind, _, spec = base.partition(":")
        if kind in REUSING_KINDS and not extras:
            return Variant(name, kind, num_experts=_positive_int(spec))
        if kind == "se":
            head, _, sparsity_text = spec.partition("@")
            k_text, _, structure = head.partition(":")
            options = tuple((k, parse_value(v)) for k, v in (e.split("=", 1) for e in extras))
            return Variant(
                name,
                "se",
                num_experts=_positive_int(k_text),
                mask_structure=normalized_mask_structure(structure) if structure else "0:0",
                sparsity=check_sparsity(float(sparsity_text)) if sparsity_text else None,
                options=options,
            )
    except ValueError as error:
        raise SystemExit(f"unknown variant {name!r} ({error}); the forms are listed in --help") from None
    raise SystemExit(f"unknown variant {name!r}; the forms are listed in --help")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def checked_variants(names: list[str], already_measured: set[str]) -> list[Variant]:
    """Parse every variant and check that each ``random:K`` / ``time:K`` / ``wd:K`` finds its model.

    Checked before the model loads: a typo or a missing ``se:K`` at the end of a list used to stop a
    run hours in, after every earlier variant had been paid for.
    """
    variants = [parse_variant(name) for name in names]
    built: set[int] = set()
    randomized: set[int] = set()
    for variant in variants:
        if variant.reusable and variant.name not in already_measured:
            built.add(variant.num_experts)
        if variant.kind not in REUSING_KINDS or variant.name in already_measured:
            continue
        source = f"se:{variant.num_experts}"
        if variant.num_experts not in built:
            if source in already_measured:
                why = f"{source} is already in the --resume file, so its model is not rebuilt"
            elif variant.num_experts in randomized:
                why = f"random:{variant.num_experts} before it replaced that model's routing"
            else:
                why = f"no {source} comes before it"
            raise SystemExit(
                f"variant {variant.name!r} reuses the model of {source}, but {why}. "
                f"Put {source} before it (and random:K after every other use), or write to another --output."
            )
        if variant.kind == "random":
            built.discard(variant.num_experts)  # its routing is replaced and the model freed
            randomized.add(variant.num_experts)
    return variants


def experts_reused(variants: list[Variant]) -> set[int]:
    """The K of every ``se:K`` model a later variant (``random:K``, ``time:K``, ``wd:K``) reuses.

    Only those models are kept after their row (the others are freed by ``release_weights``):
    an expanded model is large (SmolLM2 at K = 64 holds about 11 GB of experts), and two of them ran a
    23 GiB machine out of memory (``se:64 se:64:2:4`` in one run).
    """
    return {v.num_experts for v in variants if v.kind in REUSING_KINDS}


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def randomize_routing(model: torch.nn.Module, seed: int) -> None:
    """Replace every router's scores by uniform noise (same experts, routing independent of the input)."""
    from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

    gen = torch.Generator().manual_seed(seed)
    for router in model.modules():
        if isinstance(router, ExpertRouter):

            def scores(x: torch.Tensor, r: ExpertRouter = router) -> torch.Tensor:
                return torch.rand(x.numel() // r.in_features, r.num_experts, generator=gen)

            router.scores = scores  # type: ignore[method-assign]


def routing_router(expanded: torch.nn.Module, name: str) -> Any:
    """The router that routes the expanded linear ``name``: its own, or its MLP block's.

    Gate and up are routed by the block's router (``<mlp>.se_router``) whenever they share one, which is
    the default; only a layer that routes its own input has ``.router``.
    """
    from sparse_expansion_plugin.sparse_expansion.spec import BLOCK_ROUTER

    layer = expanded.get_submodule(name)
    if layer.router is not None:
        return layer.router
    return getattr(expanded.get_submodule(name.rpartition(".")[0]), BLOCK_ROUTER)


@torch.no_grad()
def wd_within_clusters(
    dense: torch.nn.Module, expanded: torch.nn.Module, windows: torch.Tensor, top: float, seed: int
):
    """Mean WD of each layer's top-``top`` WD gate neurons: all tokens, within clusters, within random partitions."""
    from sparse_expansion_plugin.metrics.wasserstein import wd_to_gaussian
    from sparse_expansion_plugin.modeling.targets import ffn_blocks

    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, float]] = []
    handles = []
    for block in ffn_blocks(dense):
        gate = block.gate or block.inputs[0]
        router = routing_router(expanded, gate)

        def hook(module, args, output, router=router, layer=block.layer_index):
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output.reshape(-1, output.shape[-1]).float()
            wd_all = wd_to_gaussian(y)
            k = max(1, int(round(top * y.shape[1])))
            neurons = wd_all.topk(k).indices
            assignment = router.scores(x).argmax(1)
            shuffled = assignment[torch.randperm(len(assignment), generator=gen)]

            def weighted(assign: torch.Tensor) -> float:
                total = 0.0
                for c in assign.unique():
                    rows_c = y[assign == c][:, neurons]
                    if rows_c.shape[0] >= 8:  # WD of fewer samples is meaningless
                        total += rows_c.shape[0] / len(assign) * float(wd_to_gaussian(rows_c).mean())
                covered = sum(
                    int((assign == c).sum()) for c in assign.unique() if int((assign == c).sum()) >= 8
                )
                return total * len(assign) / max(covered, 1)

            rows.append(
                {
                    "layer": layer,
                    "wd_all_tokens": float(wd_all[neurons].mean()),
                    "wd_within_clusters": weighted(assignment),
                    "wd_within_random_partition": weighted(shuffled),
                }
            )

        handles.append(dense.get_submodule(gate).register_forward_hook(hook))
    try:
        dense(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    keys = ("wd_all_tokens", "wd_within_clusters", "wd_within_random_partition")
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    return summary, rows


def build_parser() -> argparse.ArgumentParser:
    """The command line; separate from ``main`` so that the resume check can be tested without a model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--eval-tokens", type=int, default=12288, help="evaluation tokens per text at each length"
    )
    parser.add_argument("--eval-seq-lens", type=int, nargs="+", default=[512])
    parser.add_argument("--calibration-draw", choices=["random", "first"], default="random")
    parser.add_argument("--wd-windows", type=int, default=8, help="evaluation windows for the WD check")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--variants", nargs="+", default=["dense", "sparsegpt", "se:1", "se:4", "se:16", "random:16", "wd:16"]
    )
    parser.add_argument(
        "--se-options", nargs="*", default=[], help="extra SparseExpansionModifier fields, key=value"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --output (same arguments) and run only the variants missing there",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results: list[dict[str, Any]] = []
    if args.resume and args.output and args.output.exists():  # checked first: a mismatch fails in seconds
        results = rows_to_resume(args.output, args)
        logger.info("resuming: %s already measured", [r["variant"] for r in results])
    done = {r["variant"] for r in results}
    variants = checked_variants(args.variants, done)
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    se_options = dict(item.split("=", 1) for item in args.se_options)
    se_options = {k: parse_value(v) for k, v in se_options.items()}
    dense, tokenizer = load_model_and_tokenizer(args.model)
    evaluation = {  # every evaluation text on its own, at every length (--eval-tokens tokens each)
        f"{source}@{length}": token_windows(
            tokenizer, "evaluation", length, max(1, args.eval_tokens // length), sources=(source,)
        )
        for length in args.eval_seq_lens
        for source in SOURCES
    }
    calibration = seeded_calibration(
        tokenizer, args.calibration_samples, args.seq_len, args.seed, args.calibration_draw
    )
    expanded: dict[int, torch.nn.Module] = {}
    reused = experts_reused(variants)

    def compress(modifier: Any) -> tuple[torch.nn.Module, float]:
        """A fresh copy of the model compressed by ``modifier``: every variant sees the same windows."""
        model, processor = load_model_and_tokenizer(args.model)
        seconds = run_oneshot(
            model,
            processor,
            [modifier],
            args.calibration_samples,
            args.seq_len,
            args.seed,
            dataset=calibration,
        )
        return model, seconds

    def record(name: str, model: torch.nn.Module, seconds: float | None, **extra: Any) -> None:
        start = time.perf_counter()
        by_text = {
            src: token_perplexity(model, w, max(1, args.batch_size * args.seq_len // w.shape[1]))
            for src, w in evaluation.items()
        }
        ppl = math.exp(sum(math.log(v) for v in by_text.values()) / len(by_text))  # geometric mean
        row = {
            "variant": name,
            "ppl": ppl,
            "ppl_by_text": by_text,
            "compress_s": seconds,
            "eval_s": time.perf_counter() - start,
            **extra,
        }
        results.append(row)
        logger.info("%s: ppl %s", name, ", ".join(f"{k} {v:.3f}" for k, v in by_text.items()))
        save()

    def save() -> None:  # after every variant, so a long run that is cut short keeps what it measured
        if args.output:
            payload = {"args": recorded_args(args), "results": results}
            atomic_write_text(args.output, json.dumps(payload, indent=1))

    for variant in variants:
        if variant.name in done:
            continue
        if variant.kind == "dense":
            record("dense", dense, None)
        elif variant.kind in PRUNING_KINDS:
            method = SparseGPTModifier if variant.kind == "sparsegpt" else WandaPruningModifier
            modifier = method(
                sparsity=args.sparsity, mask_structure=variant.mask_structure, targets=MLP_TARGETS
            )
            model, seconds = compress(modifier)
            record(variant.name, model, seconds)
            release_weights(model)
            del model
        elif variant.kind == "se":
            variant_options = {**se_options, **dict(variant.options)}
            se_modifier = SparseExpansionModifier(
                num_experts=variant.num_experts,
                sparsity=args.sparsity if variant.sparsity is None else variant.sparsity,
                mask_structure=variant.mask_structure,
                seed=args.seed,
                **variant_options,
            )
            model, seconds = compress(se_modifier)
            cost = expansion_cost(model).as_dict()
            record(
                variant.name,
                model,
                seconds,
                cost=cost,
                options=variant_options,
                clusters=se_modifier.cluster_summary(),
            )
            if variant.reusable and variant.num_experts in reused:
                expanded[variant.num_experts] = model
            else:
                release_weights(model)
            del model
        elif variant.kind == "random":
            model = expanded[variant.num_experts]
            randomize_routing(model, args.seed)  # run wd:K before this: it uses the routers
            record(variant.name, model, None)
            release_weights(expanded.pop(variant.num_experts))
        elif variant.kind == "time":
            from sparse_expansion_plugin.sparse_expansion.layer import materialize_experts

            ids = token_windows(tokenizer, "evaluation", args.seq_len, 8)
            model = expanded[variant.num_experts]
            dense_s = median_forward_seconds(dense, ids, repeats=2)
            compact_s = median_forward_seconds(model, ids, repeats=2)
            extra_bytes = materialize_experts(model)
            materialized_s = median_forward_seconds(model, ids, repeats=2)
            materialize_experts(model, enable=False)
            row = {
                "variant": variant.name,
                "dense_forward_s": dense_s,
                "ratio_compact": compact_s / dense_s,
                "ratio_materialized": materialized_s / dense_s,
                "materialized_bytes": extra_bytes,
            }
            results.append(row)
            logger.info("%s: %s", variant.name, row)
            save()
        elif variant.kind == "wd":
            windows = token_windows(tokenizer, "evaluation", args.seq_len, args.wd_windows)
            summary, rows = wd_within_clusters(
                dense, expanded[variant.num_experts], windows, top=0.01, seed=args.seed
            )
            results.append({"variant": variant.name, "wd": summary, "wd_layers": rows})
            logger.info("%s: %s", variant.name, summary)
            save()

    print(
        f"\nSparse Expansion quality: {args.model}, {args.calibration_samples}x{args.seq_len} calibration tokens, "
        f"{args.eval_tokens} evaluation tokens per text at {args.eval_seq_lens}, seed {args.seed}, options {se_options or 'default'}\n"
    )
    by_variant = {r["variant"]: r["ppl_by_text"] for r in results if "ppl_by_text" in r}
    texts = list(evaluation)
    header = " | ".join(f"ppl {s} | gap closed {s}" for s in texts)
    print(f"| variant | {header} | stored bytes / dense (MLP) | compress s |")
    print("|---|" + "---|---|" * len(texts) + "---|---|")
    for r in results:
        if "ppl_by_text" not in r:
            continue
        reference = by_variant.get("sparsegpt-2:4") if "2:4" in r["variant"] else by_variant.get("sparsegpt")
        top_text = by_variant.get("dense")
        cells = []
        for source in texts:
            value, closed = r["ppl_by_text"][source], ""
            if reference and top_text and r["variant"] not in ("dense", "sparsegpt", "sparsegpt-2:4"):
                gap = math.log(reference[source]) - math.log(top_text[source])
                closed = f"{(math.log(reference[source]) - math.log(value)) / gap:+.0%}"
            cells.append(f"{value:.3f} | {closed}")
        size = f"{r['cost']['expanded_bytes'] / r['cost']['dense_bytes']:.2f}" if "cost" in r else ""
        seconds_text = f"{r['compress_s']:.0f}" if r.get("compress_s") else ""
        print(f"| {r['variant']} | {' | '.join(cells)} | {size} | {seconds_text} |")
        if r.get("clusters"):
            print(f"|   clusters: {r['clusters']} |")
    for r in results:
        if "ratio_compact" in r:
            print(
                f"\n{r['variant']}: forward 8x{args.seq_len} tokens / dense: compact experts "
                f"{r['ratio_compact']:.2f}x, materialized {r['ratio_materialized']:.2f}x "
                f"(+{r['materialized_bytes'] / 1e9:.2f} GB); dense {r['dense_forward_s']:.1f} s"
            )
        if "wd" in r:
            print(
                f"\n{r['variant']}: mean WD of each layer's top-1% WD gate neurons: "
                + ", ".join(f"{k} {v:.4f}" for k, v in r["wd"].items())
            )
    print(f"\npeak RSS {peak_rss_gib():.2f} GB")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
