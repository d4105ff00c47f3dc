"""Write outputs atomically: into a temporary sibling, renamed into place at the end.

Why: a crash or a bad input half-way must never leave a half-written report or
model, nor destroy the one that was there before. Every command, the demo, the
model saver and the model cache write through these functions, so there is one
place that gets the rename dance right. The temporary sibling lives in the
same directory as the output, so that publishing is a rename, never a copy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty existing ``path`` unless ``overwrite``; return it as a ``Path``.

    Call it before any heavy work, so that a wrong ``--output`` fails in a
    second, not after an hour of calibration. An empty directory is accepted:
    it holds nothing to lose.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {out} already exists and holds files; "
            "choose another or pass --overwrite (overwrite=True from Python) to replace it"
        )
    return out


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty temporary sibling of ``path``; it is deleted on exit, whatever happened.

    Use it with :func:`publish_dir` where the staged output is not the
    directory itself (e.g. a subdirectory another function creates), or where
    an existing ``path`` needs other handling than :func:`atomic_output_dir`'s.
    """
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: str | os.PathLike[str], path: str | os.PathLike[str], replace: bool = True) -> None:
    """Rename the complete directory ``staged`` to ``path`` (same filesystem).

    With ``replace`` an existing ``path`` is moved aside first and deleted only
    once the new one is in place (put back if that fails). Without it the
    rename itself refuses a non-empty existing ``path`` with ``OSError``, so of
    two processes racing to write the same output exactly one wins.
    """
    out = Path(path).absolute()
    if not replace or not (out.exists() or out.is_symlink()):
        os.replace(staged, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / "previous")
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(staged, out)
    except OSError:
        os.replace(old / "previous", out)  # the new one could not go in: keep the old one
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    An existing non-empty ``path`` is refused unless ``overwrite``
    (:func:`check_output_dir`); its contents are removed only after the new
    directory is in place.
    """
    out = check_output_dir(path, overwrite).absolute()
    with staging_dir(out) as tmp:
        yield tmp
        publish_dir(tmp, out)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to the file ``path`` through a temporary sibling and a rename.

    Readers (and a run cut short) see the old file or the new one, never half
    of one. The temporary name is unique, so concurrent writers do not clobber
    each other's halves; the file gets the usual permissions (umask).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as handle:
            handle.write(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
