"""``sparse-expansion eval``: the token-perplexity table, its JSON, and its errors.

Reference: ``token_perplexity`` called directly on ``token_windows`` of each
source and of all sources (interleaved windows: the first 2n of both sources
are the first n of each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_lm_eval import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_expansion_plugin.cli import main
from sparse_expansion_plugin.data.text import token_windows
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    path = tmp_path_factory.mktemp("tiny_eval")
    save_tiny(path, AutoTokenizer.from_pretrained(smollm2_dir), seed=4)
    return path


def test_table_and_json_match_token_perplexity(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", str(tiny_dir), "--windows", "8", "--seq-len", str(SEQ_LEN), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["source"]: r for r in json.loads(out.read_text())["rows"]}

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for source in ("python_docs", "jargon_file"):
        expected = token_perplexity(model, token_windows(tokenizer, "evaluation", SEQ_LEN, 4, (source,)))
        assert rows[source]["token_perplexity"] == pytest.approx(expected, rel=1e-6)
        assert rows[source]["windows"] == 4
    expected_all = token_perplexity(model, token_windows(tokenizer, "evaluation", SEQ_LEN, 8))
    assert rows["all"]["token_perplexity"] == pytest.approx(expected_all, rel=1e-6)
    assert rows["all"]["predicted_tokens"] == 8 * (SEQ_LEN - 1)
    assert f"{rows['all']['token_perplexity']:.4f}" in printed


def test_existing_json_is_kept_without_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    out.write_text("keep me")
    assert main(["eval", str(tiny_dir), "--windows", "2", "--seq-len", str(SEQ_LEN), "--json", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert (
        main(
            [
                "eval",
                str(tiny_dir),
                "--windows",
                "2",
                "--seq-len",
                str(SEQ_LEN),
                "--json",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["rows"][-1]["windows"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sources", "wikipedia"], "unknown text source"),
        (["--seq-len", "1"], "argument --seq-len: must be an integer >= 2"),
    ],
)
def test_bad_options_are_clear_errors(tiny_dir, capsys, extra, message):
    assert main(["eval", str(tiny_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_dir_and_dir_without_weights(tmp_path, tiny_dir, capsys):
    assert main(["eval", str(tmp_path / "gone")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "holds no weights" in capsys.readouterr().err
