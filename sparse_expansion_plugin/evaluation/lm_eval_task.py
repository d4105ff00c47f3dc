"""The token-perplexity task's class: each window's first token is the context, encoded as it is.

Why a task class: lm-eval 0.4.13's ``TemplateLM._encode_pair`` moves the
context's trailing whitespace into the continuation (right for prompts such
as ``"Question:"`` + ``" answer"``). Our context is the text of a window's
first token; when that token is only whitespace (``"\\n"`` or an indent,
about 3% of SmolLM2's 512-token windows) the context becomes empty and
``HFLM._loglikelihood_tokens`` fails ``assert len(context_enc) > 0`` (or,
with ``add_bos_token``, silently scores against BOS). No split of a window
into strings avoids this: scoring token 2 given token 1 alone needs the
context to encode to exactly that one whitespace token.

So the context travels as :class:`WindowContext`, a ``str`` whose
``rstrip()`` keeps its trailing whitespace: lm-eval then finds nothing to
move and encodes ``context`` and ``context + continuation`` exactly as they
are. This touches our own requests only; no lm-eval code or attribute is
replaced, so every other task and every model (stock ``hf`` included) is
unaffected, and stock ``hf`` scores our windows correctly too.
``task_docs.token_perplexity_docs`` checks that this encoding reproduces
each window's token ids.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask


class WindowContext(str):
    """The exact text of a window's first token: lm-eval must not move its trailing whitespace.

    Equal to, hashed and serialised (json, pickle) like the plain string; only
    ``rstrip()`` without arguments differs, returning the text unchanged.
    """

    __slots__ = ()

    def rstrip(self, chars: str | None = None) -> str:
        return str(self) if chars is None else super().rstrip(chars)


class TokenPerplexityTask(ConfigurableTask):
    """``ConfigurableTask`` whose loglikelihood requests carry the window's first token as a :class:`WindowContext`."""

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        # lm-eval hands a YAML-defined class the whole YAML, its own `class:` key included, which
        # TaskConfig does not accept.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def construct_requests(self, doc: dict, ctx: str | list[str], **kwargs: Any) -> list[Instance] | Instance:
        if ctx != doc["context"]:
            raise ValueError(
                f"task {self.config.task}: the prompt of window {doc.get('window')} is {ctx[:40]!r}..., not the "
                "window's first token: token perplexity scores each window from its own first token, so run it "
                "without --num_fewshot, --system_instruction or --apply_chat_template"
            )
        instance = super().construct_requests(doc, ctx, **kwargs)
        if not isinstance(instance, Instance) or len(instance.arguments) != 2:
            raise TypeError(f"task {self.config.task} must have output_type loglikelihood")
        _, continuation = instance.arguments
        instance.arguments = (WindowContext(doc["context"]), continuation)
        return instance
