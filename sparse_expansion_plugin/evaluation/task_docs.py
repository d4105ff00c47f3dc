"""Documents of the offline lm-eval tasks, built from the bundled evaluation text.

Three kinds, named by what they measure:

- **token perplexity over fixed windows** (``token_perplexity_docs``): the
  windows of ``data.text.token_windows`` (the papers' number, the same windows
  ``sparse-expansion eval`` scores). Each window becomes one lm-eval
  ``loglikelihood`` request, context = its first token, continuation = the
  rest, so lm-eval scores exactly tokens 2..L from their prefix.
- **word / byte perplexity** (``word_perplexity_docs``): what lm-eval's
  ``wikitext`` reports, a rolling log-likelihood over whole documents
  normalised by words or bytes instead of tokens (tokenizer-independent).
- **continuation choice** (``continuation_choice_docs``): a small
  multiple-choice task; given the first half of a paragraph, pick its true
  next words among spans taken from other paragraphs of the same source.

Pure functions over text and a tokenizer, so they can be tested without lm-eval.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from sparse_expansion_plugin.data.text import SOURCES, bundled_text, token_windows


def parse_sources(sources: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a,b"`` / ``["a", "b"]`` / ``None`` (all bundled sources) -> a tuple of source names."""
    if sources is None:
        return SOURCES
    if isinstance(sources, str):
        sources = [s for s in sources.replace("+", ",").split(",") if s.strip()]
    parsed = tuple(s.strip() for s in sources)
    if not parsed:
        raise ValueError(f"no text source given; choose from {', '.join(SOURCES)}")
    return parsed


def _lm_eval_encoding(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list, list]:
    """The token ids lm-eval scores for our request: the context as it is (``lm_eval_task.WindowContext``), the rest.

    ``TemplateLM._encode_pair`` for a causal model with nothing to strip:
    ``tok(context)`` and ``tok(context + continuation)[len(tok(context)):]``.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def token_perplexity_docs(
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int = 512,
    num_windows: int | None = None,
    sources: str | Sequence[str] | None = None,
) -> list[dict]:
    """One document per window of ``token_windows(tokenizer, "evaluation", seq_len, num_windows, sources)``.

    Each doc: ``window`` (index), ``context`` (text of token 1), ``continuation``
    (text of tokens 2..L), ``predicted_tokens`` (L-1). Raises if lm-eval would
    re-tokenise a window into other tokens (then the number would not be the
    token perplexity of these windows).
    """
    windows = token_windows(tokenizer, "evaluation", seq_len, num_windows, parse_sources(sources))
    docs = []
    for index, row in enumerate(windows.tolist()):
        context = tokenizer.decode(row[:1])
        continuation = tokenizer.decode(row[1:])
        if not isinstance(context, str) or not isinstance(continuation, str):  # one id list -> one string
            raise TypeError(f"{type(tokenizer).__name__}.decode returned a list for one window's token ids")
        ctx, cont = _lm_eval_encoding(tokenizer, context, continuation)
        if ctx != row[:1] or cont != row[1:]:
            raise ValueError(
                f"window {index} does not survive decode -> encode with tokenizer "
                f"{getattr(tokenizer, 'name_or_path', tokenizer)!r}, so lm-eval would score other tokens; "
                "use `sparse-expansion eval` (which scores token ids directly) for this tokenizer"
            )
        docs.append(
            {
                "window": index,
                "context": context,
                "continuation": continuation,
                "predicted_tokens": len(row) - 1,
            }
        )
    return docs


def _paragraphs(source: str) -> list[str]:
    return [p.strip() for p in bundled_text(source, "evaluation").split("\n") if p.strip()]


def word_perplexity_docs(sources: str | Sequence[str] | None = None, words_per_doc: int = 1000) -> list[dict]:
    """Consecutive evaluation paragraphs of each source joined into documents of about ``words_per_doc`` words.

    Each doc: ``source``, ``text``. A document never mixes sources; the last
    one of a source may be shorter.
    """
    if words_per_doc < 1:
        raise ValueError(f"words_per_doc must be positive, got {words_per_doc}")
    docs = []
    for source in parse_sources(sources):
        chunk: list[str] = []
        words = 0
        for paragraph in _paragraphs(source):
            chunk.append(paragraph)
            words += len(paragraph.split())
            if words >= words_per_doc:
                docs.append({"source": source, "text": "\n".join(chunk)})
                chunk, words = [], 0
        if chunk:
            docs.append({"source": source, "text": "\n".join(chunk)})
    return docs


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def continuation_choice_docs(
    source: str,
    num_docs: int = 200,
    num_choices: int = 4,
    answer_words: int = 8,
    min_context_words: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Multiple-choice docs: ``context`` (first half of a paragraph), ``choices``, ``label``.

    The true choice is the ``answer_words`` words that follow the context; the
    others are spans of the same length from other paragraphs of ``source``.
    Paragraphs are taken evenly across the evaluation text; the answer's
    position is drawn from a seeded RNG, so the task is the same on every run.
    """
    (source,) = parse_sources(source)
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    usable = [p.split() for p in _paragraphs(source)]
    usable = [w for w in usable if len(w) >= min_context_words + answer_words]
    if len(usable) < num_choices:
        raise ValueError(f"source {source!r} has only {len(usable)} paragraphs long enough for this task")
    step = max(1, len(usable) // num_docs)
    picked = list(range(0, len(usable), step))[:num_docs]
    docs = []
    for i in picked:
        rng = random.Random(_stable_seed(source, seed, i))
        words = usable[i]
        cut = max(min_context_words, (len(words) - answer_words) // 2)
        answer = " ".join(words[cut : cut + answer_words])
        choices = [answer]
        while len(choices) < num_choices:
            j = rng.randrange(len(usable))
            if j == i:
                continue
            other = usable[j]
            start = rng.randrange(0, len(other) - answer_words + 1)
            span = " ".join(other[start : start + answer_words])
            if span not in choices:
                choices.append(span)
        rng.shuffle(choices)
        docs.append(
            {
                "source": source,
                "paragraph": i,
                "context": " ".join(words[:cut]),
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    return docs
