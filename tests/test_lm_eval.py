"""lm-eval integration: the ``sparse-expansion`` model, the offline tasks, and their numbers.

References: ``token_perplexity`` on ``token_windows`` (the package's one
perplexity definition) computed on the in-memory model that was saved; a
direct forward pass for word perplexity; the paragraph text itself for the
multiple-choice documents; lm-eval's stock ``hf`` model for the wrapper.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_expansion_plugin.data.text import bundled_text, token_windows
from sparse_expansion_plugin.evaluation import task_docs
from sparse_expansion_plugin.evaluation.lm_eval_cli import TASKS_DIR
from sparse_expansion_plugin.evaluation.perplexity import token_perplexity

SEQ_LEN = 32
WINDOWS = (
    24  # windows 2 and 17 of SmolLM2's 32-token windows start with "\n": the whitespace case is exercised
)
TOKEN_TASK = "sparse_expansion_token_perplexity"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def save_tiny(path: Path, tokenizer, seed: int = 0, prune: bool = False) -> torch.nn.Module:
    """A tiny random Llama over SmolLM2's vocabulary saved with its tokenizer; returns the saved model."""
    model = make_tiny_llama(seed=seed, vocab=len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = None
    if prune:  # what a 50% SparseGPT checkpoint looks like on disk: dense tensors, half zeros per row
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                weight = module.weight.data
                threshold = weight.abs().median(dim=1, keepdim=True).values
                weight[weight.abs() <= threshold] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_dense")
    save_tiny(path, tokenizer)
    return path


def run_in_fresh_python(code: str) -> None:
    """Run ``code`` in a new interpreter (fresh ``sys.modules``, fresh registries); it must exit 0."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def evaluate(
    model: str, model_args: dict, tasks: list[str], metadata: dict | None = None, limit=None
) -> dict:
    """lm-eval's own ``simple_evaluate`` with our task directory included; returns ``results``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import sparse_expansion_plugin.evaluation.lm_eval_model  # noqa: F401  (registers sparse-expansion)

    metadata = dict(model_args) | (metadata or {})
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        # include_defaults=False: skip indexing lm-eval's ~10k built-in YAMLs (5 s per call here).
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata),
        metadata=metadata,
        limit=limit,
        device="cpu",
        batch_size=4,
    )
    return out["results"]


def reference_token_ppl(model_dir: Path, tokenizer) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return token_perplexity(model, token_windows(tokenizer, "evaluation", SEQ_LEN, WINDOWS), batch_size=5)


# --------------------------------------------------------------------------- documents


def test_token_docs_are_the_token_windows(tokenizer):
    docs = task_docs.token_perplexity_docs(tokenizer, SEQ_LEN, WINDOWS)
    windows = token_windows(tokenizer, "evaluation", SEQ_LEN, WINDOWS)
    assert len(docs) == WINDOWS
    for doc, row in zip(docs, windows.tolist(), strict=True):
        assert tokenizer(doc["context"] + doc["continuation"], add_special_tokens=False)["input_ids"] == row
        assert tokenizer(doc["context"], add_special_tokens=False)["input_ids"] == row[:1]
        assert doc["predicted_tokens"] == SEQ_LEN - 1
    assert any(not d["context"].strip() for d in docs), (
        "no whitespace-only first token: the compat path is untested"
    )


def test_word_docs_cover_the_evaluation_text_in_order():
    docs = task_docs.word_perplexity_docs("jargon_file", words_per_doc=300)
    paragraphs = [p.strip() for p in bundled_text("jargon_file", "evaluation").split("\n") if p.strip()]
    assert "\n".join(d["text"] for d in docs) == "\n".join(paragraphs)
    assert all(len(d["text"].split()) >= 300 for d in docs[:-1])


def test_choice_docs_hold_the_true_continuation_and_are_stable():
    docs = task_docs.continuation_choice_docs("python_docs", num_docs=40)
    again = task_docs.continuation_choice_docs("python_docs", num_docs=40)
    assert docs == again and len(docs) == 40
    text = " ".join(bundled_text("python_docs", "evaluation").split())
    for doc in docs:
        assert len(set(doc["choices"])) == 4
        assert f"{doc['context']} {doc['choices'][doc['label']]}" in text
    labels = [d["label"] for d in docs]
    assert len(set(labels)) == 4, f"answer always in the same slots: {labels}"


def test_unknown_source_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown text source 'wikipedia'"):
        task_docs.token_perplexity_docs(tokenizer, SEQ_LEN, 2, "wikipedia")


# --------------------------------------------------------------------------- numbers through lm-eval


def test_token_task_equals_token_perplexity(tiny_dir, tokenizer):
    expected = reference_token_ppl(tiny_dir, tokenizer)
    meta = {"seq_len": SEQ_LEN, "num_windows": WINDOWS}
    for model in ("sparse-expansion", "hf"):  # ours, and lm-eval's stock HF model on the same task
        results = evaluate(model, {"pretrained": str(tiny_dir), "dtype": "float32"}, [TOKEN_TASK], meta)
        got = results[TOKEN_TASK]["token_perplexity,none"]
        assert got == pytest.approx(expected, rel=1e-4), model


def test_word_task_equals_direct_rolling_likelihood(tiny_dir, tokenizer):
    """Word/byte perplexity = exp(-sum log p(doc | BOS) / words or bytes), docs shorter than the context."""
    meta = {"sources": "python_docs", "words_per_doc": 40}
    results = evaluate(
        "sparse-expansion",
        {"pretrained": str(tiny_dir), "dtype": "float32"},
        ["sparse_expansion_word_perplexity"],
        meta,
        limit=3,
    )
    docs = task_docs.word_perplexity_docs("python_docs", 40)[:3]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    total_ll, words, nbytes = 0.0, 0, 0
    for doc in docs:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) < 255
        inp = torch.tensor([[tokenizer.bos_token_id, *ids]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0, :-1].double(), dim=-1)
        total_ll += logp.gather(1, inp[0, 1:, None]).sum().item()
        words += len(doc["text"].split())
        nbytes += len(doc["text"].encode())
    got = results["sparse_expansion_word_perplexity"]
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes), rel=1e-4)


def test_choice_task_accuracy_equals_direct_scoring(tiny_dir, tokenizer):
    """acc = mean over docs of [argmax_c log p(" " + choice_c | context) == label], scored by direct forwards."""
    task = "sparse_expansion_jargon_file_choice"
    results = evaluate(
        "sparse-expansion", {"pretrained": str(tiny_dir), "dtype": "float32"}, [task], {"mc_docs": 8}
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    correct = []
    for doc in task_docs.continuation_choice_docs("jargon_file", 8):
        scores = []
        for choice in doc["choices"]:
            ctx = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(f"{doc['context']} {choice}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            scores.append(logp[len(ctx) - 1 :].gather(1, ids[0, len(ctx) :, None]).sum().item())
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert results[task]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_whitespace_only_context_is_kept_and_others_unchanged(tokenizer):
    """lm-eval alone empties a whitespace-only context (then asserts); the fix keeps it, touching nothing else."""
    from types import SimpleNamespace

    from lm_eval.api.model import TemplateLM

    from sparse_expansion_plugin.evaluation.lm_eval_compat import keep_whitespace_only_context

    keep_whitespace_only_context()
    lm = SimpleNamespace(
        backend="causal", tok_encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    newline = lm.tok_encode("\n")
    context, continuation = TemplateLM._encode_pair(lm, "\n", "def f():")
    assert context == newline and newline + continuation == lm.tok_encode("\ndef f():")
    original = TemplateLM._encode_pair.__wrapped__
    for pair in [("Hello", " world"), ("Hello ", "world"), ("x\n", "y")]:
        assert TemplateLM._encode_pair(lm, *pair) == original(lm, *pair)


def test_stock_lm_eval_gets_the_fix_from_the_task_file():
    """``lm_eval --include_path`` imports tasks/utils.py only (not our model): that import must apply the fix."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('utils', {str(TASKS_DIR / 'utils.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "from lm_eval.api.model import TemplateLM\n"
        "assert TemplateLM._encode_pair._sparse_expansion_keeps_whitespace_context\n"
        "assert 'sparse_expansion_plugin.evaluation.lm_eval_model' not in sys.modules\n"
    )
    run_in_fresh_python(code)


# --------------------------------------------------------------------------- the wrapper


def test_lazy_registration_imports_the_wrapper_only_when_asked(tmp_path):
    code = (
        "import sys\n"
        "from sparse_expansion_plugin.evaluation.lm_eval_registry import register_lm_eval_model\n"
        "assert register_lm_eval_model()\n"
        "assert 'sparse_expansion_plugin.evaluation.lm_eval_model' not in sys.modules\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('sparse-expansion').__name__ == 'SparseExpansionLM'\n"
        "assert get_model('hf').__name__ == 'HFLM'\n"
    )
    run_in_fresh_python(code)


def test_registration_keeps_builtin_models():
    from lm_eval.api.registry import get_model

    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    assert get_model("sparse-expansion") is SparseExpansionLM
    assert get_model("hf").__name__ == "HFLM" and get_model("dummy").__name__ == "DummyLM"


def test_wrapper_loads_a_pruned_dir(tmp_path, tokenizer):
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    saved = save_tiny(tmp_path / "pruned", tokenizer, seed=1, prune=True)
    lm = SparseExpansionLM(pretrained=str(tmp_path / "pruned"), device="cpu", dtype="float32")
    gate = lm.model.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(gate, saved.model.layers[0].mlp.gate_proj.weight)
    assert (gate == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_parallelize_builds_a_device_map_on_cpu(tiny_dir, tmp_path):
    """parallelize=True with a CPU memory cap: accelerate splits the model between cpu and disk offload."""
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    size = sum(
        p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters()
    )
    lm = SparseExpansionLM(
        pretrained=str(tiny_dir),
        device="cpu",
        dtype="float32",
        parallelize=True,
        max_cpu_memory=size,  # accelerate keeps room for the largest layer: part of the model goes to disk
        offload_folder=str(tmp_path / "offload"),
    )
    placement = set(lm.model.hf_device_map.values())
    assert "disk" in placement and placement & {"cpu", 0, "cpu:0"}, lm.model.hf_device_map
    dense = SparseExpansionLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    ids = torch.tensor([[1, 500, 900, 33, 7]])
    with torch.no_grad():
        assert torch.allclose(lm._model_call(ids), dense._model_call(ids), atol=1e-5)


def test_missing_dir_is_a_clear_error(tmp_path):
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseExpansionLM(pretrained=str(tmp_path / "no_such_model"), device="cpu")


def test_dir_without_weights_is_a_clear_error(tmp_path, tiny_dir):
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        SparseExpansionLM(pretrained=str(tmp_path), device="cpu")


# --------------------------------------------------------------------------- expanded models


def expand_tiny(model: torch.nn.Module, num_experts: int = 2, seed: int = 0) -> torch.nn.Module:
    """Give every MLP random routers and K half-pruned experts per linear (built with the modeling API)."""
    from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear
    from sparse_expansion_plugin.sparse_expansion.router import ExpertRouter

    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        mlp = layer.mlp
        routers = {}
        for leaf in ("gate_proj", "down_proj"):
            router = ExpertRouter(getattr(mlp, leaf).in_features, num_experts)
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
            setattr(mlp, f"se_router_{leaf}", router)
            routers[leaf] = router
        for leaf, router in (
            ("gate_proj", routers["gate_proj"]),
            ("up_proj", routers["gate_proj"]),
            ("down_proj", routers["down_proj"]),
        ):
            weight = getattr(mlp, leaf).weight.data
            experts = torch.stack(
                [weight * (torch.rand(weight.shape, generator=gen) > 0.5) for _ in range(num_experts)]
            )
            setattr(mlp, leaf, ExpandedLinear.from_experts(experts, router))
    return model.eval()


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tokenizer):
    """(directory written by save_expanded, the in-memory expanded model it holds)."""
    from sparse_expansion_plugin.sparse_expansion.model import save_expanded

    model = make_tiny_llama(seed=2, vocab=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = None
    expand_tiny(model)
    path = save_expanded(model, tokenizer, tmp_path_factory.mktemp("expanded") / "model")
    return path, model


def test_wrapper_loads_an_expanded_dir_without_remote_code(expanded):
    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM
    from sparse_expansion_plugin.sparse_expansion.layer import expanded_linears

    path, model = expanded
    lm = SparseExpansionLM(pretrained=str(path), device="cpu", trust_remote_code=False)
    assert len(expanded_linears(lm.model)) == len(expanded_linears(model)) == 6
    ids = torch.tensor([[1, 500, 900, 33, 7, 4000]])
    with torch.no_grad():
        assert torch.allclose(lm._model_call(ids), model(ids).logits, atol=1e-5)


def test_token_task_on_an_expanded_dir_ours_and_stock_hf_remote_code(expanded, tokenizer):
    path, model = expanded
    expected = token_perplexity(model, token_windows(tokenizer, "evaluation", SEQ_LEN, WINDOWS), batch_size=5)
    meta = {"seq_len": SEQ_LEN, "num_windows": WINDOWS}
    ours = evaluate("sparse-expansion", {"pretrained": str(path)}, [TOKEN_TASK], meta)
    stock = evaluate("hf", {"pretrained": str(path), "trust_remote_code": True}, [TOKEN_TASK], meta)
    assert ours[TOKEN_TASK]["token_perplexity,none"] == pytest.approx(expected, rel=1e-4)
    assert stock[TOKEN_TASK]["token_perplexity,none"] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- the real model (slow, short)


@pytest.mark.slow
def test_smollm2_token_task_equals_token_perplexity(smollm2, smollm2_dir):
    model, tokenizer = smollm2
    expected = token_perplexity(model, token_windows(tokenizer, "evaluation", 128, 6), batch_size=3)
    results = evaluate(
        "sparse-expansion", {"pretrained": "smollm2-135m"}, [TOKEN_TASK], {"seq_len": 128, "num_windows": 6}
    )
    # The issue's bound. A wrong window or a dropped prediction would move the number by > 1e-3 here;
    # a log-softmax over the strided vocabulary dimension (our first version) moved it by 1.4e-4.
    assert results[TOKEN_TASK]["token_perplexity,none"] == pytest.approx(expected, rel=1e-4)
    assert 5 < expected < 100, "SmolLM2 should model documentation text far better than chance"


@pytest.mark.slow
def test_smollm2_answers_the_choice_task_above_chance():
    """16 questions, 4 choices: chance gives 4 +- 1.7 right (P(>= 10) < 0.1%); a real LM should get far more."""
    results = evaluate(
        "sparse-expansion",
        {"pretrained": "smollm2-135m"},
        ["sparse_expansion_python_docs_choice"],
        {"mc_docs": 16},
    )
    assert results["sparse_expansion_python_docs_choice"]["acc,none"] >= 10 / 16
