"""Shared fixtures: a tiny random Llama (fast unit tests) and the real SmolLM2 (slow tests)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    vocab: int = 128,
    mlp_bias: bool = False,
):
    """A random LlamaForCausalLM small enough for unit tests (not for quality claims)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        mlp_bias=mlp_bias,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 converted to a float HF directory (cached across runs)."""
    from sparse_expansion_plugin.data import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from sparse_expansion_plugin.data import load_model_and_tokenizer

    return load_model_and_tokenizer(smollm2_dir)


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/<name>.py`` (a script, not a package) for a test, then leave sys.path as it was."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(benchmarks))
