"""Glue between the task YAMLs here and ``sparse_expansion_plugin.evaluation.task_docs``.

lm-eval imports this file when it reads the YAMLs (``!function utils.x``).
Keyword arguments come from ``--metadata`` merged with ``--model_args`` (so
``pretrained``/``tokenizer`` name the tokenizer of the token-perplexity task).
Options go through ``--metadata``, e.g. ``--metadata seq_len=128 num_windows=8
sources=python_docs+jargon_file`` (``+`` separates sources: lm-eval splits
``--metadata`` on commas).
"""

from __future__ import annotations

from typing import Any

import datasets

from sparse_expansion_plugin.evaluation import task_docs
from sparse_expansion_plugin.evaluation.lm_eval_task import TokenPerplexityTask  # noqa: F401  (the token YAML's `class:`)


def _tokenizer(tokenizer: Any = None, pretrained: Any = None, trust_remote_code: Any = False, **_: Any):
    from transformers import AutoTokenizer

    from sparse_expansion_plugin.data.locations import resolve_model_location

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    name = tokenizer if isinstance(tokenizer, str) else pretrained
    if name is not None and not isinstance(name, str):  # an in-memory model was passed to lm-eval
        name = getattr(name, "name_or_path", None) or None
    if name is None:
        raise ValueError(
            "the token-perplexity task needs the model's tokenizer: pass --model_args pretrained=DIR "
            "or --metadata tokenizer=DIR_OR_NAME"
        )
    return AutoTokenizer.from_pretrained(
        resolve_model_location(name), trust_remote_code=str(trust_remote_code) == "True"
    )


def _as_dataset(docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def token_perplexity_dataset(
    seq_len: int = 512, num_windows: int | None = None, sources: str | None = None, **metadata: Any
) -> datasets.DatasetDict:
    """Fixed windows of the bundled evaluation text, tokenised by the model's tokenizer."""
    docs = task_docs.token_perplexity_docs(
        _tokenizer(**metadata), int(seq_len), None if num_windows is None else int(num_windows), sources
    )
    return _as_dataset(docs)


def word_perplexity_dataset(
    sources: str | None = None, words_per_doc: int = 1000, **_: Any
) -> datasets.DatasetDict:
    """Documents of about ``words_per_doc`` words of the bundled evaluation text."""
    return _as_dataset(task_docs.word_perplexity_docs(sources, int(words_per_doc)))


def jargon_file_choice_dataset(mc_docs: int = 200, **_: Any) -> datasets.DatasetDict:
    return _as_dataset(task_docs.continuation_choice_docs("jargon_file", int(mc_docs)))


def python_docs_choice_dataset(mc_docs: int = 200, **_: Any) -> datasets.DatasetDict:
    return _as_dataset(task_docs.continuation_choice_docs("python_docs", int(mc_docs)))


def window_context(doc: dict) -> str:
    """Text of the window's first token (returned as is: a template would be free to trim it)."""
    return doc["context"]


def window_continuation(doc: dict) -> str:
    return doc["continuation"]


def token_perplexity_results(doc: dict, results: list) -> dict:
    """``(log-likelihood of tokens 2..L, L-1)``, aggregated as exp(-sum ll / sum tokens)."""
    loglikelihood, _is_greedy = results[0]
    return {"token_perplexity": (loglikelihood, doc["predicted_tokens"])}
