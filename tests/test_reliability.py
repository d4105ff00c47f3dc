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

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
UNRELATED = "notes.txt"


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` with ``{model}`` (a tiny saved model), ``{recipe}`` and ``{home}`` filled in."""

    id: str
    what: str
    argv: tuple[str, ...]
    expect: str
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def _mark_cwd_as_ours(cwd: Path) -> None:
    """The working directory is an old output of ours (marker present): still never replaced."""
    from sparse_expansion_plugin.outputs import write_marker

    write_marker(cwd)


def _make_home(cwd: Path) -> None:
    (cwd / "home").mkdir()
    (cwd / "home" / "thesis.tex").write_text("years of work")


def _make_cache(cwd: Path) -> None:
    (cwd / "cache" / "smollm2-135m-instruct").mkdir(parents=True)
    (cwd / "cache" / "smollm2-135m-instruct" / "config.json").write_text("{}")


def _foreign_dir(cwd: Path) -> None:
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

CASES = [*OUTPUT_CASES]


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
        case.setup(cwd)
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
