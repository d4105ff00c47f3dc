"""The README's main job end to end, on a tiny random model (the real-model run is the README's command)."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_expansion_plugin.demo import DemoConfig, run_demo
from sparse_expansion_plugin.modeling.targets import ffn_blocks
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from sparse_expansion_plugin.data import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = make_tiny_llama(vocab=len(tokenizer), hidden=32, intermediate=64)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_writes_table_models_and_plots(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="sparse_expansion_plugin.sparse_expansion.modifier")
    out = tmp_path / "demo"
    config = DemoConfig(
        model=str(tiny_model_dir),
        num_experts=2,
        calibration_samples=4,
        seq_len=64,
        eval_windows=2,
        analysis_windows=4,
    )
    rows = run_demo(out, config)
    assert [r["model"] for r in rows] == ["dense", "SparseGPT 50%", "Sparse Expansion K=2"]
    assert all(r["ppl_python_docs"] > 1 and r["ppl_jargon_file"] > 1 for r in rows)
    assert {p.name for p in out.iterdir()} >= {
        "analysis",
        "sparsegpt",
        "sparse_expansion",
        "results.csv",
        "results.json",
        "results.png",
    }
    printed = capsys.readouterr().out
    assert "log-perplexity gap SparseGPT->dense closed by Sparse Expansion" in printed
    assert "Sparse Expansion clusters: MLP input: smallest cluster" in printed
    # FLOPs per token, by hand: 2 per FFN weight for dense and SparseGPT (dense kernel); the expanded
    # model adds its routers (2 K d per router): by default one per MLP block, on the hidden size, which
    # routes gate, up and down alike
    config_json = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, inter, layers = (
        config_json["hidden_size"],
        config_json["intermediate_size"],
        config_json["num_hidden_layers"],
    )
    ffn = layers * 3 * hidden * inter * 2
    routers = layers * 2 * 2 * hidden
    assert [r["ffn_mflops_per_token"] * 1e6 for r in rows] == pytest.approx([ffn, ffn, ffn + routers])
    # The SparseGPT model that was saved really is 50% sparse in its FFN linears, and only there.
    pruned = AutoModelForCausalLM.from_pretrained(out / "sparsegpt")
    for block in ffn_blocks(pruned):
        for name in (*block.inputs, block.output):
            weight = pruned.get_submodule(name).weight
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (pruned.model.layers[0].self_attn.q_proj.weight == 0).float().mean() < 0.01
    # Stored bytes: SparseGPT's values+mask are about half of dense; K=2 experts about as much as dense.
    dense_bytes, sgpt_bytes, se_bytes = (r["ffn_bytes"] for r in rows)
    assert 0.5 < sgpt_bytes / dense_bytes < 0.56
    assert 1.0 < se_bytes / dense_bytes < 1.2
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    # The demo's Sparse Expansion runs with the soft Hessians the README says it uses (scale 0.5),
    # once per MLP block (one router per block), as the modifier's own log line reports.
    soft = [r.getMessage() for r in caplog.records if "soft Hessians, median score gap" in r.getMessage()]
    assert len(soft) == layers and all(m.endswith("scale 0.5") for m in soft)


def test_demo_refuses_existing_output(tiny_model_dir, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(tmp_path / "demo", DemoConfig(model=str(tiny_model_dir)))
    assert (tmp_path / "demo" / "results.csv").read_text() == "keep me"
