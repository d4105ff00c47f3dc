"""Write outputs atomically, and never replace anything this package did not write.

Why: a crash or a bad input half-way must never leave a half-written report or
model, nor destroy the one that was there before; and ``--overwrite`` must
never delete a directory the user cares about (``--output . --overwrite`` once
deleted the working directory). Every command, the demo, the model saver and
the model cache write through these functions, so there is one place that
gets this right:

- outputs are built in a temporary sibling and renamed into place at the end
  (publishing is a rename, never a copy);
- every directory we publish holds a marker file (:data:`MARKER`, JSON saying
  what wrote it); ``overwrite`` replaces a non-empty directory only if it
  holds that marker;
- some locations are refused whatever the flags (:func:`protected_locations`):
  the working directory, the home directory, the filesystem root, the input
  model's directory, the model cache, and any parent of those;
- temporary siblings left by a killed run are removed by the next run.

Light on purpose (no torch): the CLI checks ``--output`` before loading anything.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from sparse_expansion_plugin.data.locations import cache_dir

MARKER = ".sparse_expansion_output"
"""Name of the file that marks a directory as written by this package (JSON: tool, version, command, time)."""

_STARTED = time.time()  # temporaries older than this process (this module's import) may be stale
# Our temporary siblings of NAME: ".NAME.tmp-PID-XXXX" / ".NAME.old-PID-XXXX" directories,
# ".NAME.PID-HEX.tmp" files; ".NAME.tmp-XXXXXXXX" without a pid was the 0.1.0 spelling.
_TEMP = re.compile(
    r"^\.(?P<name>.+)\.(?:(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[\w]+|(?P<fpid>\d+)-[0-9a-f]+\.tmp)$"
)


def package_version() -> str:
    """The installed version of sparse-expansion-plugin (``"unknown"`` from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparse-expansion-plugin")
    except PackageNotFoundError:
        return "unknown"


def write_marker(directory: str | os.PathLike[str], **extra: object) -> Path:
    """Write :data:`MARKER` into ``directory``: we wrote it, so ``overwrite`` may replace it later.

    ``extra`` fields (e.g. ``command="compress"``) are added to the JSON.
    """
    info = {
        "written_by": "sparse-expansion-plugin",
        "version": package_version(),
        "argv": sys.argv,
        "pid": os.getpid(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    path = Path(directory) / MARKER
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return path


def is_our_output(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds our :data:`MARKER` (a directory this package wrote)."""
    return (Path(directory) / MARKER).is_file()


def protected_locations(inputs: Iterable[str | os.PathLike[str]] = ()) -> list[tuple[Path, str]]:
    """Directories an output must never be, nor be a parent of: ``[(resolved path, what it is)]``.

    ``inputs`` are the command's input models; those that exist locally are
    protected (hub names are skipped).
    """
    places = [
        (Path.cwd(), "the current working directory"),
        (Path.home(), "your home directory"),
        (Path(Path.cwd().anchor or "/"), "the filesystem root"),
        (cache_dir(), "the package's model cache"),
    ]
    for item in inputs:
        path = Path(item).expanduser()
        if path.exists():
            places.append((path if path.is_dir() else path.parent, "the input model's directory"))
    return [(p.resolve(), what) for p, what in places]


def _check_not_protected(out: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    resolved = out.resolve()
    places = protected_locations(inputs)
    hits = [("is", p, w) for p, w in places if resolved == p]  # name the place itself before its children
    hits += [("is a parent of", p, w) for p, w in places if resolved in p.parents]
    for relation, place, what in hits[:1]:
        raise FileExistsError(
            f"refusing to write to {out}: it {relation} {what} ({place}), which would be replaced "
            "as a whole; give a new directory, e.g. --output runs/NAME"
        )
    cache = cache_dir().resolve()
    if cache in resolved.parents:
        raise FileExistsError(
            f"refusing to write to {out}: it is inside the package's model cache ({cache}); "
            "give a directory outside it, e.g. --output runs/NAME"
        )


def _check_writable(out: Path) -> None:
    """Refuse an output whose parent cannot be created or written (tried, not ``os.access``: root ignores it)."""
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            f"cannot write {out}: {parent} is a file, not a directory; choose another path"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparse_expansion_probe-", dir=parent))
    except OSError as error:
        raise PermissionError(
            f"cannot write {out}: {parent} is not writable ({error.strerror}); choose an output "
            "location you can write to"
        ) from None


def check_output_dir(
    path: str | os.PathLike[str], overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse an output ``path`` that must not be written; return it as a ``Path``.

    Refused whatever ``overwrite`` says: a protected location or a parent of
    one (:func:`protected_locations`; ``inputs`` are the input models), a
    path inside the model cache, an existing file, and a location that cannot
    be written. A non-empty existing directory is refused unless
    ``overwrite``, and even then unless it holds our :data:`MARKER`. An empty
    directory is accepted: it holds nothing to lose. Call it before any heavy
    work, so a wrong ``--output`` fails in a second, not after calibration.
    """
    out = Path(path).expanduser()
    _check_not_protected(out, inputs)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already exists and holds files; "
                "choose another or pass --overwrite (overwrite=True from Python) to replace it"
            )
        if not is_our_output(out):
            raise FileExistsError(
                f"output directory {out} holds files that sparse-expansion did not write (no {MARKER} "
                "marker), so --overwrite will not replace it; choose a new directory, or delete it "
                "yourself if you are sure"
            )
    _check_writable(out)
    return out


def check_output_file(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an output file ``path`` that exists (unless ``overwrite``), is a directory, or cannot be written.

    The file counterpart of :func:`check_output_dir`, for single-file outputs
    (``eval --json``): call it before the work, not after.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give a file path (e.g. {out / 'results.json'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another path")
    _check_writable(out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``path`` that a killed run left behind; return what was removed.

    Ours by name (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.PID-HEX.tmp``),
    created before this process started, and, where the name carries a pid,
    whose process is gone (a concurrent writer's temporaries are left alone).
    An ``.old-*`` directory still holding the previous output while ``path``
    itself is missing (killed between the two renames of :func:`publish_dir`)
    is put back, not deleted.
    """
    out = Path(path).absolute()
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or match["name"] != out.name:
            continue
        pid = match["pid"] or match["fpid"]
        try:
            if entry.lstat().st_mtime >= _STARTED or (pid is not None and _pid_alive(int(pid))):
                continue
            previous = entry / "previous"
            if match["kind"] == "old" and previous.exists() and not (out.exists() or out.is_symlink()):
                os.replace(previous, out)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue  # vanished meanwhile, or not ours to remove: leave it
    return removed


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty temporary sibling of ``path``; it is deleted on exit, whatever happened.

    Stale siblings of earlier killed runs are cleaned first
    (:func:`clean_stale_siblings`). Use it with :func:`publish_dir` where the
    staged output is not the directory itself (e.g. a subdirectory another
    function creates), or where an existing ``path`` needs other handling
    than :func:`atomic_output_dir`'s.
    """
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: str | os.PathLike[str], path: str | os.PathLike[str], replace: bool = True) -> None:
    """Rename the complete directory ``staged`` to ``path`` (same filesystem).

    With ``replace`` an existing ``path`` is moved aside first and deleted only
    once the new one is in place (put back if that fails). Without it the
    rename itself refuses a non-empty existing ``path`` with ``OSError``, so of
    two processes racing to write the same output exactly one wins. Callers
    check ``path`` with :func:`check_output_dir` first; this function does not.
    """
    out = Path(path).absolute()
    if not replace or not (out.exists() or out.is_symlink()):
        os.replace(staged, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
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
def atomic_output_dir(
    path: str | os.PathLike[str],
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    marker: dict[str, object] | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    ``path`` is checked with :func:`check_output_dir` (``inputs``: the input
    models, protected) before the block and again just before publishing (an
    output that appeared meanwhile is treated alike). The directory gets our
    :data:`MARKER` (with ``marker``'s fields), so a later ``overwrite`` may
    replace it; the old contents are removed only after the new directory is
    in place.
    """
    inputs = list(inputs)
    out = check_output_dir(path, overwrite, inputs).absolute()
    with staging_dir(out) as tmp:
        write_marker(tmp, **(marker or {}))
        yield tmp
        check_output_dir(out, overwrite, inputs)
        publish_dir(tmp, out)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to the file ``path`` through a temporary sibling and a rename.

    Readers (and a run cut short) see the old file or the new one, never half
    of one. The temporary name is unique, so concurrent writers do not clobber
    each other's halves; the file gets the usual permissions (umask). Stale
    temporaries of killed runs are cleaned first.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as handle:
            handle.write(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
