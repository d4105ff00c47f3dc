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
import os
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


def _multi_cpu_if_launched_without_gpus() -> None:
    """Make ``accelerate launch --num_processes N`` data-parallel on a machine without GPUs.

    accelerate starts N processes (``WORLD_SIZE=N``) but, unless told to use
    the CPU, each one builds a single-process ``Accelerator`` and evaluates
    every document. (``accelerate launch --cpu`` itself starts one process.)
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def our_task_names() -> list[str]:
    """Names of the offline tasks shipped in ``TASKS_DIR``."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI (``argv`` defaults to ``sys.argv[1:]``) with our model and tasks; returns the exit code.

    Bad input (missing model directory, directory without weights, unknown
    task or model) prints one line naming the problem instead of a traceback.
    """
    _multi_cpu_if_launched_without_gpus()
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
    try:
        parser.execute(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        if "Tasks not found" in message:
            message += f" (offline tasks of this package: {', '.join(our_task_names())}; `lm-eval ls tasks` lists all)"
        print(f"sparse-expansion-lm-eval: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
