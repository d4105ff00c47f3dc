"""``sparse-expansion-lm-eval``: the ``lm_eval`` CLI with our model and our offline tasks.

Same flags and output as ``lm_eval`` (it *is* lm-eval's ``HarnessCLI``); two
additions: ``--model sparse-expansion`` is registered before arguments are
parsed, and the package's task directory is added to ``--include_path`` (next
to any path you give), so ``--tasks sparse_expansion_token_perplexity`` works
offline. Runs as a console script, ``python -m``, and under
``accelerate launch -m sparse_expansion_plugin.evaluation.lm_eval_cli``
(one model copy per process, documents sharded across processes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")
"""Directory of the offline task YAMLs shipped with the package."""


def _with_our_tasks(args: argparse.Namespace) -> None:
    if getattr(args, "command", None) not in ("run", "ls", "validate") or not hasattr(args, "include_path"):
        return
    given = args.include_path
    paths = [str(TASKS_DIR)] + ([given] if isinstance(given, str) else list(given or []))
    args.include_path = paths if len(paths) > 1 else paths[0]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (``argv`` defaults to ``sys.argv[1:]``) with our model and tasks available."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from sparse_expansion_plugin.evaluation import lm_eval_model

    lm_eval_model.register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    _with_our_tasks(args)
    parser.execute(args)


if __name__ == "__main__":
    main()
