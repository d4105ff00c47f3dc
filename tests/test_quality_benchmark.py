"""``benchmarks/sparse_expansion_quality.py``: ``--resume`` keeps rows only from a file written with the
same measuring arguments, so one table never mixes seeds, calibration sizes or evaluation setups; and
only the models a later variant reuses are kept after their row (the others are freed, see
``release_weights`` in ``tests/test_sparse_expansion.py``), so two K = 64 models never sit in memory
together."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module, make_tiny_llama


@pytest.fixture(scope="module")
def quality():
    with benchmark_module("sparse_expansion_quality") as module:
        yield module


def written_by(quality, argv: list[str], path: Path, rows: list[dict]) -> None:
    """A results file as the script saves it."""
    args = parse(quality, argv + ["--output", str(path)])
    path.write_text(json.dumps({"args": quality.recorded_args(args), "results": rows}))


def parse(quality, argv: list[str]):
    return quality.build_parser().parse_args(argv)


BASE = ["--calibration-samples", "128", "--seq-len", "2048", "--eval-seq-lens", "512", "2048", "--seed", "0"]
ROWS = [{"variant": "dense", "ppl": 1.0}, {"variant": "sparsegpt", "ppl": 2.0}]


def test_same_arguments_keep_every_row_even_with_other_variants(quality, tmp_path):
    out = tmp_path / "run.json"
    written_by(quality, BASE + ["--variants", "dense", "sparsegpt"], out, ROWS)
    now = parse(
        quality, BASE + ["--variants", "dense", "sparsegpt", "se:16", "--output", str(out), "--resume"]
    )
    assert quality.rows_to_resume(out, now) == ROWS


@pytest.mark.parametrize(
    ("changed", "flag"),
    [
        (["--seed", "1"], "--seed"),
        (["--calibration-samples", "512", "--seq-len", "512"], "--calibration-samples"),
        (["--eval-seq-lens", "512"], "--eval-seq-lens"),
        (["--sparsity", "0.6"], "--sparsity"),
        (["--se-options", "prior_tokens=1024"], "--se-options"),
    ],
)
def test_other_measuring_arguments_are_refused_by_name(quality, tmp_path, changed, flag):
    out = tmp_path / "run.json"
    written_by(quality, BASE, out, ROWS)
    now = parse(quality, BASE + changed + ["--output", str(out), "--resume"])
    with pytest.raises(SystemExit, match=flag) as refused:
        quality.rows_to_resume(out, now)
    assert "another --output" in str(refused.value)
    assert json.loads(out.read_text())["results"] == ROWS  # the file is left as it was


def test_a_file_without_an_argument_the_script_now_records_is_refused(quality, tmp_path):
    out = tmp_path / "old.json"
    written_by(quality, BASE, out, ROWS)
    stored = json.loads(out.read_text())
    del stored["args"]["calibration_draw"]  # as files written before the option existed
    out.write_text(json.dumps(stored))
    now = parse(quality, BASE + ["--output", str(out), "--resume"])
    with pytest.raises(SystemExit, match="--calibration-draw: file <absent>, now random"):
        quality.rows_to_resume(out, now)


def test_main_refuses_before_loading_a_model(quality, tmp_path, monkeypatch):
    out = tmp_path / "run.json"
    written_by(quality, BASE, out, ROWS)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(quality, "load_model_and_tokenizer", no_model)
    with pytest.raises(SystemExit, match="--seed: file 0, now 2"):
        quality.main(BASE[:-1] + ["2", "--output", str(out), "--resume"])


@pytest.mark.parametrize(
    ("variants", "kept"),
    [
        (["dense", "sparsegpt", "se:16", "se:64", "se:64:2:4"], set()),
        (["se:16", "wd:16", "random:16", "se:64"], {16}),
        (["se:4", "se:16", "time:4", "random:16"], {4, 16}),
    ],
)
def test_only_models_a_later_variant_reuses_are_kept(quality, variants, kept):
    assert quality.experts_reused(quality.checked_variants(variants, set())) == kept


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("dense", {"kind": "dense", "num_experts": 0, "mask_structure": "0:0", "sparsity": None}),
        ("sparsegpt-2:4", {"kind": "sparsegpt", "mask_structure": "2:4"}),
        ("wanda", {"kind": "wanda", "mask_structure": "0:0"}),
        (
            "se:16",
            {"kind": "se", "num_experts": 16, "mask_structure": "0:0", "sparsity": None, "options": ()},
        ),
        ("se:64:2:4", {"kind": "se", "num_experts": 64, "mask_structure": "2:4"}),
        ("se:2@0.75", {"kind": "se", "num_experts": 2, "sparsity": 0.75}),
        (
            "se:16+prior_tokens=1024+router_space=pca",
            {"num_experts": 16, "options": (("prior_tokens", 1024), ("router_space", "pca"))},
        ),
        ("random:16", {"kind": "random", "num_experts": 16}),
        ("wd:4", {"kind": "wd", "num_experts": 4}),
    ],
)
def test_variant_names_parse_into_their_parts(quality, name, fields):
    variant = quality.parse_variant(name)
    assert {key: getattr(variant, key) for key in fields} == fields
    assert variant.reusable == (name == "se:16")


@pytest.mark.parametrize(
    "name",
    [
        "se16",
        "se:0",
        "se:x",
        "se:16:2",
        "se:16@half",
        "se:16+prior_tokens",
        "sparsegpt-24",
        "random:",
        "tim:4",
    ],
)
def test_an_unknown_variant_is_refused_by_name(quality, name):
    with pytest.raises(SystemExit, match=f"unknown variant '{re.escape(name)}'"):
        quality.parse_variant(name)


@pytest.mark.parametrize(
    ("variants", "measured", "why"),
    [
        (["dense", "random:16"], set(), "no se:16 comes before it"),
        (["random:16", "se:16"], set(), "no se:16 comes before it"),
        (["se:16+prior_tokens=0", "wd:16"], set(), "no se:16 comes before it"),
        (["se:16", "random:16", "wd:16"], set(), "random:16 before it"),
        (["se:16", "wd:16"], {"se:16"}, "already in the --resume file"),
    ],
)
def test_a_variant_whose_model_will_not_exist_is_refused_before_the_run(quality, variants, measured, why):
    with pytest.raises(SystemExit, match=why):
        quality.checked_variants(variants, measured)


def test_a_resumed_reuse_needs_nothing_when_it_is_measured_too(quality):
    names = ["se:16", "random:16", "se:4"]
    assert [v.name for v in quality.checked_variants(names, {"se:16", "random:16"})] == names


def test_main_refuses_an_unknown_variant_before_loading_a_model(quality, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the variants were checked")

    monkeypatch.setattr(quality, "load_model_and_tokenizer", no_model)
    with pytest.raises(SystemExit, match="unknown variant 'se:16:24'"):
        quality.main(BASE + ["--variants", "dense", "sparsegpt", "se:16:24"])


def test_wd_check_uses_the_routing_the_expanded_model_uses(quality, tmp_path):
    """``wd:K`` reads each gate's routing from the router that routes it (the MLP block's by default).

    Independent check: with that router sending every token to one expert, "within clusters" must be the
    WD over all tokens; had the check used any other routing, the two would differ.
    """
    from test_sparse_expansion import VOCAB, compress

    from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

    path = tmp_path / "tiny"
    make_tiny_llama(layers=2, hidden=32, intermediate=64, vocab=VOCAB).save_pretrained(path)
    dense = make_tiny_llama(layers=2, hidden=32, intermediate=64, vocab=VOCAB)
    expanded = compress(path, [SparseExpansionModifier(num_experts=2, sparsity=0.5, seed=0)])
    windows = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))

    summary, rows = quality.wd_within_clusters(dense, expanded, windows, top=0.1, seed=0)
    assert [row["layer"] for row in rows] == [0, 1]
    assert all(math.isfinite(value) for value in summary.values())

    for layer in range(2):
        router = quality.routing_router(expanded, f"model.layers.{layer}.mlp.gate_proj")
        router.scores = lambda x, r=router: torch.eye(r.num_experts)[0].expand(x.shape[0], -1)
    summary, rows = quality.wd_within_clusters(dense, expanded, windows, top=0.1, seed=0)
    for row in rows:
        assert row["wd_within_clusters"] == pytest.approx(row["wd_all_tokens"], rel=1e-6)
