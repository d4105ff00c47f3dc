"""Print README's reliability table: each bad input the tests try, and what the user gets.

Generated, not written by hand: the cases are ``tests/test_reliability.py``'s
``CASES`` (the same list its test asserts on), each run through
``sparse_expansion_plugin.cli.main`` in a fresh temporary working directory
with a tiny random model; a row shows the exit code and the error line, with
temporary paths shortened to ``.`` and ``MODEL``. Cases of one bad input
(the same flag in several sub-commands, or -3 and 0) are merged into one row
naming the sub-commands; the first case's error line stands for them all.

    .venv/bin/python scripts/reliability_table.py reliability.md

(With no argument the table goes to stdout, after whatever the libraries log
there while the cases run; give a file for the table alone.)
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_reliability import CASES, Case, run_case, tiny_model  # noqa: E402

_TIMESTAMP = re.compile(r"^\S+ \| \S+ \| \w+ - ")


def _shorten(line: str, cwd: Path, model: Path) -> str:
    line = _TIMESTAMP.sub("", line)
    for path, name in ((model, "MODEL"), (cwd, ".")):
        line = line.replace(str(path.resolve()), name).replace(str(path), name)
    return line.replace("|", "\\|")


def _command(case: Case) -> str:
    return case.argv[0]


def main(argv: list[str]) -> int:
    rows: dict[tuple[str, int], tuple[str, list[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="reliability-") as root:
        model = tiny_model(Path(root) / "model")
        for index, case in enumerate(CASES):
            cwd = Path(root) / f"case{index}"
            code, line = run_case(case, cwd, model)
            if code != case.code or case.expect not in line:
                print(f"case {case.id} no longer behaves as its test says: {code} {line}", file=sys.stderr)
                return 1
            line = _shorten(line, cwd, model).replace(
                f"sparse-expansion {_command(case)}:", "sparse-expansion CMD:"
            )
            # One row per bad input: its first case's line stands for the others (each is asserted by its test).
            rows.setdefault((case.what, code), (line, []))[1].append(_command(case))
    table = ["| bad input | sub-commands | exit | what the user gets |", "|---|---|---|---|"]
    for (what, code), (line, commands) in rows.items():
        table.append(f"| {what} | {', '.join(dict.fromkeys(commands))} | {code} | `{line}` |")
    if argv:
        Path(argv[0]).write_text("\n".join(table) + "\n")
    else:
        print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
