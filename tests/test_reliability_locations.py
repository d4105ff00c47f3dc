"""data/locations.py: the one answer to "local directory or hub name?", and the cheap checks of a model dir.

References: huggingface_hub's own repo-id validator (what the hub accepts as
a name) and safetensors' writer (what a complete file is).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.numpy import save_file

from sparse_expansion_plugin.data.locations import (
    ModelLocationError,
    check_model_dir,
    check_seq_len,
    checked_model_location,
    max_positions,
    resolve_model_location,
)

SPELLINGS = [
    "EleutherAI/pythia-1.4b",
    "gpt2",
    "HuggingFaceTB/SmolLM2-135M",
    "org/name.with.dots",
    "./model",
    "../model",
    "/abs/model",
    "~/model",
    "a/b/c",
    "org/..",
    "org--x/name",
    "runs/missing",
]


def _hub_accepts(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(("/", "~", "."))


@pytest.mark.parametrize("name", SPELLINGS)
def test_missing_names_go_to_the_hub_exactly_when_the_hub_would_accept_them(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # none of these exist here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if _hub_accepts(name):
        assert resolve_model_location(name) == name  # a str: the hub path, untouched
    else:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_location(name)


def test_an_existing_local_directory_wins_over_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EleutherAI" / "pythia-1.4b").mkdir(parents=True)
    assert resolve_model_location("EleutherAI/pythia-1.4b") == tmp_path / "EleutherAI" / "pythia-1.4b"
    assert isinstance(resolve_model_location(Path("EleutherAI")), Path)
    with pytest.raises(FileNotFoundError):  # an explicit Path is never a hub name
        resolve_model_location(Path("gpt2"))


def _saved(path: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (path / "tokenizer.json").write_text("{}")
    save_file(tensors or {"w": np.ones((4, 4), dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def test_a_complete_directory_passes_and_each_damage_is_named(tmp_path):
    good = _saved(tmp_path / "good")
    assert check_model_dir(good) == good
    weights = (good / "model.safetensors").read_bytes()
    for cut in (len(weights) - 1, 8 + 10, 4):
        bad = _saved(tmp_path / f"cut{cut}")
        (bad / "model.safetensors").write_bytes(weights[:cut])
        with pytest.raises(ModelLocationError, match="not a complete safetensors file"):
            check_model_dir(bad)
    longer = _saved(tmp_path / "longer")
    (longer / "model.safetensors").write_bytes(weights + b"\0" * 16)
    with pytest.raises(ModelLocationError, match="not a complete safetensors file"):
        check_model_dir(longer)


def test_a_sharded_directory_needs_every_shard(tmp_path):
    model = _saved(tmp_path / "sharded")
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLocationError, match="missing weight shard"):
        check_model_dir(model)
    save_file({"v": np.zeros(2, dtype=np.float32)}, str(model / "model-00002-of-00002.safetensors"))
    check_model_dir(model)


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        ({"max_position_embeddings": 2048}, 2048),
        ({"n_positions": 1024, "n_ctx": 1024}, 1024),  # GPT-2
        ({"text_config": {"max_position_embeddings": 512}}, 512),
        ({"model_type": "x"}, None),
    ],
)
def test_max_positions_reads_the_usual_config_keys(config, limit):
    assert max_positions(config) == limit


def test_seq_len_is_refused_past_the_model_limit_and_accepted_up_to_it(tmp_path):
    model = _saved(tmp_path / "m")
    check_seq_len(model, 64)
    with pytest.raises(ModelLocationError, match="maximum of 64 positions"):
        check_seq_len(model, 65)
    with pytest.raises(ModelLocationError, match="--calib-len 65"):
        check_seq_len({"n_positions": 64}, 65, flag="--calib-len")
    check_seq_len("EleutherAI/pythia-1.4b", 10**6)  # a hub name: not checked without a network
    with pytest.raises(ModelLocationError, match="maximum of 64"):
        checked_model_location(str(model), seq_len=100)
