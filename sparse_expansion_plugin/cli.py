"""The ``sparse-expansion`` command: one entry point, one module per sub-command.

Each sub-command lives in ``sparse_expansion_plugin/commands/<name>.py`` and
provides ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their sub-command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, str] = {
    "demo": "Run the whole pipeline on the embedded default and print one table",
    "analyze": "Per-neuron Wasserstein distance, mapping difficulty and kurtosis of FFN layers",
    "compress": "Run an llm-compressor recipe (SparseGPT, WD-aware SparseGPT, Sparse Expansion) and save",
    "eval": "Token perplexity of a model or compressed directory on the evaluation text",
    "ablate": "Negative-computation ablation: clamp pre-activations of top/random/bottom WD neurons",
    "pairs": "Token pairs with the highest output/input ratio for a layer's most entangled neurons",
    "plan": "Memory and FLOPs of a Sparse Expansion run (compression and inference) from config.json alone",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-expansion", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:]
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the chosen sub-command's module is imported (and its arguments added).
        if name in argv:
            importlib.import_module(f"sparse_expansion_plugin.commands.{name}").add_arguments(sub)
    return parser


# Errors that mean "this input cannot work": one line on stderr and exit code 2, no traceback.
USAGE_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; return its exit code (2 for a bad argument, after one line on stderr)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        args = build_parser().parse_args()
    except SystemExit as stop:  # argparse has printed the usage error (code 2) or the help (code 0)
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(f"sparse_expansion_plugin.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except USAGE_ERRORS as error:
        print(f"sparse-expansion {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
