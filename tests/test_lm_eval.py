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
        "no whitespace-only first token: the whitespace-context case is untested"
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


def token_task(metadata: dict):
    """Our token-perplexity task as lm-eval's TaskManager builds it from the YAML."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    return manager.load(TOKEN_TASK)["tasks"][TOKEN_TASK]


def test_stock_hf_scores_each_windows_own_token_ids(tiny_dir, tokenizer):
    """The ids stock ``HFLM`` scores for each request are the window's ids from ``token_windows``.

    Context = token 1, continuation = tokens 2..L, for every window, the whitespace-first ones
    included (lm-eval alone would empty their context and fail its own assert).
    """
    from lm_eval.models.huggingface import HFLM

    class Captured(HFLM):
        def _loglikelihood_tokens(self, requests, **kwargs):
            self.encoded = [(ctx, cont) for _, ctx, cont in requests]
            return [(0.0, False)] * len(requests)

    task = token_task({"pretrained": str(tiny_dir), "seq_len": SEQ_LEN, "num_windows": WINDOWS})
    task.build_all_requests()
    lm = Captured(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    lm.loglikelihood([instance for instance in task.instances], disable_tqdm=True)
    windows = token_windows(tokenizer, "evaluation", SEQ_LEN, WINDOWS).tolist()
    by_window = {
        instance.doc["window"]: pair for instance, pair in zip(task.instances, lm.encoded, strict=True)
    }
    assert sorted(by_window) == list(range(WINDOWS))
    for index, row in enumerate(windows):
        assert by_window[index] == (row[:1], row[1:]), (
            f"window {index} (first token {tokenizer.decode(row[:1])!r})"
        )
    assert any(not tokenizer.decode(row[:1]).strip() for row in windows), "no whitespace-first window tested"


def test_token_task_refuses_a_prompt_other_than_the_first_token(tiny_dir):
    task = token_task({"pretrained": str(tiny_dir), "seq_len": SEQ_LEN, "num_windows": 2})
    task.set_config("description", "Read this code. ")
    with pytest.raises(
        ValueError, match="without --num_fewshot, --system_instruction or --apply_chat_template"
    ):
        task.build_all_requests()


def test_our_imports_change_no_lm_eval_attribute(tiny_dir):
    """Importing our package, model and task code replaces no attribute of any lm-eval module or class."""
    code = f"""
import importlib.util, inspect, sys
import lm_eval.api.model, lm_eval.api.task, lm_eval.api.instance, lm_eval.api.registry
import lm_eval.models, lm_eval.models.huggingface, lm_eval.models.utils_hf, lm_eval.tasks

def snapshot():
    seen = {{}}
    for name, module in list(sys.modules.items()):
        if name == "lm_eval" or name.startswith("lm_eval."):
            for attr, value in list(vars(module).items()):
                seen[(name, attr)] = value
                if inspect.isclass(value) and value.__module__ == name:
                    for member, item in list(vars(value).items()):
                        seen[(name, attr, member)] = item
    return seen

before = snapshot()
import sparse_expansion_plugin
import sparse_expansion_plugin.evaluation.lm_eval_model
import sparse_expansion_plugin.evaluation.lm_eval_task
spec = importlib.util.spec_from_file_location("utils", {str(TASKS_DIR / "utils.py")!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from lm_eval.tasks import TaskManager
manager = TaskManager(include_path={str(TASKS_DIR)!r}, include_defaults=False,
                      metadata={{"pretrained": {str(tiny_dir)!r}, "seq_len": 8, "num_windows": 2}})
manager.load({TOKEN_TASK!r})
after = snapshot()
changed = sorted(str(key) for key, value in before.items() if key not in after or after[key] is not value)
assert not changed, changed
"""
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


def test_scoring_forward_builds_no_kv_cache_and_gives_stock_logits(tiny_dir):
    """Our ``_model_call`` asks for no KV cache (HFLM's builds one nobody reads) and returns the logits
    stock ``HFLM._model_call`` returns."""
    from lm_eval.models.huggingface import HFLM

    from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

    lm = SparseExpansionLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    calls: list[dict] = []
    lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    ids = torch.tensor([[1, 500, 900, 33, 7], [4, 8, 15, 16, 23]])
    ours = lm._model_call(ids)
    stock = HFLM._model_call(lm, ids)
    assert calls[0].get("use_cache") is False and calls[1].get("use_cache", True) is not False
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="holds no weights"):
        SparseExpansionLM(pretrained=str(tmp_path), device="cpu")


# --------------------------------------------------------------------------- expanded models


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tokenizer):
    """(directory written by save_expanded, the in-memory expanded model it holds)."""
    from test_save_load import expand_randomly  # the save/load tests' random expansion (block API)

    from sparse_expansion_plugin.sparse_expansion.model import save_expanded

    model = make_tiny_llama(seed=2, vocab=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = None
    expand_randomly(model, num_experts=2).eval()
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
