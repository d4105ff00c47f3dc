"""Bad input tried as a new user would: every case exits 2 with one clear line, and nothing on disk is lost.

Each :class:`Case` runs ``sparse_expansion_plugin.cli.main`` in a fresh
working directory that holds an unrelated file (``notes.txt``); the test
checks the exit code, that the error line names the problem (``expect``), and
that ``notes.txt`` (and the model) survived. ``scripts/reliability_table.py``
imports :data:`CASES` and :func:`run_case` and prints README's table from
them, so the table is what these tests assert.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import test_reliability_recipes as recipes

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
UNRELATED = "notes.txt"


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` with ``{model}`` (a tiny saved model), ``{recipe}`` and ``{home}`` filled in."""

    id: str
    what: str
    argv: tuple[str, ...]
    expect: str
    setup: Callable[[Path, Path], None] | None = None  # (cwd, model)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def _mark_cwd_as_ours(cwd: Path, model: Path) -> None:
    """The working directory is an old output of ours (marker present): still never replaced."""
    from sparse_expansion_plugin.outputs import write_marker

    write_marker(cwd)


def _make_home(cwd: Path, model: Path) -> None:
    (cwd / "home").mkdir()
    (cwd / "home" / "thesis.tex").write_text("years of work")


def _make_cache(cwd: Path, model: Path) -> None:
    (cwd / "cache" / "smollm2-135m-instruct").mkdir(parents=True)
    (cwd / "cache" / "smollm2-135m-instruct" / "config.json").write_text("{}")


def _foreign_dir(cwd: Path, model: Path) -> None:
    (cwd / "results").mkdir()
    (cwd / "results" / "paper.csv").write_text("not ours")


def _compress(output: str, *extra: str) -> tuple[str, ...]:
    return ("compress", "{model}", "--recipe", "{recipe}", "--output", output, *extra)


OUTPUT_CASES = [
    Case(
        "output-cwd",
        "`compress --output . --overwrite`",
        _compress(".", "--overwrite"),
        "current working directory",
    ),
    Case(
        "output-cwd-marked",
        "`--output . --overwrite` where `.` is an old output of ours",
        _compress(".", "--overwrite"),
        "current working directory",
        setup=_mark_cwd_as_ours,
    ),
    Case(
        "output-parent", "`--output .. --overwrite`", _compress("..", "--overwrite"), "parent of the current"
    ),
    Case(
        "output-home",
        "`--output ~ --overwrite`",
        _compress("~", "--overwrite"),
        "your home directory",
        setup=_make_home,
        env={"HOME": "{cwd}/home"},
    ),
    Case("output-root", "`--output / --overwrite`", _compress("/", "--overwrite"), "filesystem root"),
    Case(
        "output-model-dir",
        "`--output MODEL_DIR --overwrite` (the input model)",
        _compress("{model}", "--overwrite"),
        "input model's directory",
    ),
    Case(
        "output-cache",
        "`--output $SPARSE_EXPANSION_CACHE --overwrite`",
        _compress("{cwd}/cache", "--overwrite"),
        "model cache",
        setup=_make_cache,
        env={"SPARSE_EXPANSION_CACHE": "{cwd}/cache"},
    ),
    Case(
        "output-foreign",
        "`--output DIR --overwrite`, DIR holding files we did not write",
        _compress("results", "--overwrite"),
        "did not write",
        setup=_foreign_dir,
    ),
    Case(
        "output-existing",
        "`--output DIR` (existing, no `--overwrite`)",
        _compress("results"),
        "pass --overwrite",
        setup=_foreign_dir,
    ),
    Case(
        "output-under-file",
        "`--output notes.txt/out` (parent is a file)",
        _compress(f"{UNRELATED}/out"),
        "is a file",
    ),
]

OUTPUT_CASES.append(
    Case(
        "output-unwritable",
        "`--output /proc/out` (a location nobody can write)",
        _compress("/proc/sparse_expansion_out"),
        "not writable",
    )
)

# Every count and size flag of every sub-command, with the rest of the command valid.
BASE_ARGV: dict[str, tuple[str, ...]] = {
    "analyze": ("analyze", "{model}", "--output", "out"),
    "compress": ("compress", "{model}", "--recipe", "{recipe}", "--output", "out"),
    "eval": ("eval", "{model}"),
    "ablate": ("ablate", "{model}", "--output-dir", "out"),
    "pairs": ("pairs", "{model}", "--layer", "0", "--output-dir", "out"),
    "demo": ("demo", "{model}", "--output", "out"),
}
COUNT_FLAGS: dict[str, tuple[str, ...]] = {
    "analyze": ("--windows", "--batch-size", "--pairs"),
    "compress": ("--num-calibration-samples",),
    "eval": ("--windows", "--batch-size"),
    "ablate": (
        "--calibration-windows",
        "--eval-windows",
        "--batch-size",
        "--random-repeats",
        "--histogram-neurons",
        "--histogram-windows",
    ),
    "pairs": (
        "--windows",
        "--num-pairs",
        "--neurons",
        "--pairs-per-neuron",
        "--plot-neurons",
        "--batch-size",
    ),
    "demo": ("--experts", "--calibration-samples", "--eval-windows"),
}
ARGUMENT_CASES = [
    Case(
        f"{command}{flag}={value}",
        f"`{flag} -3` or `{flag} 0`",
        (*BASE_ARGV[command], flag, value),
        f"argument {flag}: must be a positive integer, got {value}",
    )
    for command, flags in COUNT_FLAGS.items()
    for flag in flags
    for value in ("-3", "0")
]
ARGUMENT_CASES += [
    Case(f"{command}--seq-len=1", "`--seq-len 1`", (*BASE_ARGV[command], "--seq-len", "1"), "got 1")
    for command in BASE_ARGV
]
ARGUMENT_CASES += [
    Case(
        f"{command}--seq-len-too-long",
        "`--seq-len 1024` on a model of 256 positions",
        (*BASE_ARGV[command], "--seq-len", "1024"),
        "longer than the model's maximum of 256 positions",
    )
    for command in BASE_ARGV
]
ARGUMENT_CASES += [
    Case(
        "ablate--percents=0", "`ablate --percents 0`", (*BASE_ARGV["ablate"], "--percents", "0"), "(0, 100]"
    ),
    Case(
        "ablate--percents=150",
        "`ablate --percents 150`",
        (*BASE_ARGV["ablate"], "--percents", "150"),
        "(0, 100]",
    ),
    Case("demo--sparsity=1.5", "`demo --sparsity 1.5`", (*BASE_ARGV["demo"], "--sparsity", "1.5"), "[0, 1)"),
    Case(
        "analyze--windows=x",
        "`analyze --windows many`",
        (*BASE_ARGV["analyze"], "--windows", "many"),
        "integer",
    ),
    Case(
        "compress--calibration-text",
        "`compress --calibration-text wikipedia`",
        (*BASE_ARGV["compress"], "--calibration-text", "wikipedia"),
        "unknown source",
    ),
    Case(
        "eval--json-unwritable",
        "`eval --json /proc/ppl.json` (a location nobody can write)",
        (*BASE_ARGV["eval"], "--json", "/proc/ppl.json"),
        "not writable",
    ),
    Case(
        "eval--json-directory",
        "`eval --json DIR` (a directory)",
        (*BASE_ARGV["eval"], "--json", "."),
        "is a directory",
    ),
    Case("analyze--seed=-1", "`analyze --seed -1`", (*BASE_ARGV["analyze"], "--seed", "-1"), ">= 0"),
]


def _copy_model(cwd: Path, model: Path, skip: tuple[str, ...] = ()) -> Path:
    target = cwd / "bad"
    target.mkdir()
    for file in model.iterdir():
        if file.name not in skip:
            (target / file.name).write_bytes(file.read_bytes())
    return target


def _missing(cwd: Path, model: Path) -> None:
    pass


def _empty_dir(cwd: Path, model: Path) -> None:
    (cwd / "bad").mkdir()


def _config_only(cwd: Path, model: Path) -> None:
    (cwd / "bad").mkdir()
    (cwd / "bad" / "config.json").write_bytes((model / "config.json").read_bytes())


def _garbage_config(cwd: Path, model: Path) -> None:
    (_copy_model(cwd, model) / "config.json").write_text("{not json")


def _truncated_weights(cwd: Path, model: Path) -> None:
    weights = _copy_model(cwd, model) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage_weights(cwd: Path, model: Path) -> None:
    (_copy_model(cwd, model) / "model.safetensors").write_bytes(bytes(range(256)) * 64)


def _no_tokenizer(cwd: Path, model: Path) -> None:
    _copy_model(cwd, model, skip=("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"))


MODEL_PROBLEMS = [
    ("a relative path that does not exist", "./missing-model", _missing, "does not exist"),
    (
        "`org/name` that is neither a local directory nor reachable on the hub",
        "runs/missing",
        _missing,
        "hub",
    ),
    ("a file instead of a directory", UNRELATED, _missing, "is a file"),
    ("an empty directory", "bad", _empty_dir, "is empty"),
    ("a directory with only config.json", "bad", _config_only, "holds no weights"),
    ("a config.json that is not JSON", "bad", _garbage_config, "is not valid JSON"),
    ("a truncated model.safetensors", "bad", _truncated_weights, "not a complete safetensors file"),
    ("a garbage model.safetensors", "bad", _garbage_weights, "not a complete safetensors file"),
    ("a model directory without tokenizer files", "bad", _no_tokenizer, "holds no tokenizer"),
]
MODEL_CASES = [
    Case(
        f"{command}-model-{index}",
        what,
        tuple(path if a == "{model}" else a for a in BASE_ARGV[command]),
        expect,
        setup=setup,
    )
    for index, (what, path, setup, expect) in enumerate(MODEL_PROBLEMS)
    for command in BASE_ARGV
]


def _recipe_writer(text: str) -> Callable[[Path, Path], None]:
    def write(cwd: Path, model: Path) -> None:
        (cwd / "recipe.yaml").write_text(text)

    return write


RECIPE_CASES = [
    Case(
        f"recipe-{name}",
        what,
        ("compress", "{model}", "--recipe", "recipe.yaml", "--output", "out"),
        expect,
        setup=_recipe_writer(text),
    )
    for name, what, text, expect in [
        (
            "se+sparsegpt",
            "a recipe with SparseGPT (`targets: [Linear]`) and Sparse Expansion",
            recipes.one_stage(recipes.SGPT, recipes.SE),
            "experts would come out identical",
        ),
        (
            "se+fp8",
            "a recipe with Sparse Expansion then QuantizationModifier (FP8)",
            recipes.two_stages(recipes.SE, recipes.FP8),
            "does not support quantization",
        ),
        (
            "wd+fp8",
            "a recipe with WD-aware SparseGPT and QuantizationModifier (FP8)",
            recipes.one_stage(recipes.WD, recipes.FP8),
            "separate recipe on the pruned dense model",
        ),
        ("flat", "a flat recipe (no stage)", "SparseGPTModifier:\n  sparsity: 0.5\n", "not stages"),
        (
            "mask",
            "`mask_structure: '2-4'`",
            "s_stage:\n  s_modifiers:\n    SparseGPTModifier:\n      mask_structure: '2-4'\n",
            "mask_structure must look like 'N:M'",
        ),
    ]
]

CASES = [*OUTPUT_CASES, *ARGUMENT_CASES, *MODEL_CASES, *RECIPE_CASES]


def tiny_model(path: Path) -> Path:
    """A tiny random Llama with the embedded SmolLM2's tokenizer, saved to ``path`` (seconds, offline)."""
    from transformers import AutoTokenizer

    from sparse_expansion_plugin.data import default_model_dir
    from tests.conftest import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    make_tiny_llama(seed=3, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def _environment(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    old_cwd, saved = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_case(case: Case, cwd: Path, model: Path) -> tuple[int, str]:
    """Run ``case`` through ``cli.main`` with ``cwd`` as working directory; return (exit code, error line)."""
    from sparse_expansion_plugin.cli import main

    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / UNRELATED).write_text("keep me")
    if case.setup is not None:
        case.setup(cwd, model)
    fill = {"model": str(model), "recipe": str(RECIPES / "sparsegpt_50.yaml"), "cwd": str(cwd)}
    argv = [a.format(**fill) for a in case.argv]
    env = {k: v.format(**fill) for k, v in case.env.items()}
    stderr = io.StringIO()
    with _environment(cwd, env), contextlib.redirect_stderr(stderr):
        code = main(argv)
    lines = stderr.getvalue().splitlines()
    errors = [line for line in lines if "error:" in line]
    return code, (errors or lines or [""])[-1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("reliability-model"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_line_and_loses_nothing(case, model, tmp_path):
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    code, line = run_case(case, tmp_path / "cwd", model)
    assert code == case.code, line
    assert case.expect in line
    assert (tmp_path / "cwd" / UNRELATED).read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    if (tmp_path / "cwd" / "home").exists():
        assert (tmp_path / "cwd" / "home" / "thesis.tex").read_text() == "years of work"
    if (tmp_path / "cwd" / "results").exists():
        assert (tmp_path / "cwd" / "results" / "paper.csv").read_text() == "not ours"
