"""outputs.py: the one temp-then-rename helper every command, the saver and the model cache use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sparse_expansion_plugin.outputs import (
    MARKER,
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
    clean_stale_siblings,
    publish_dir,
    staging_dir,
)


def _write(directory, name, text):
    (directory / name).write_text(text)


def test_atomic_output_dir_refuses_then_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        _write(tmp, "a.txt", "first")
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        check_output_dir(out, overwrite=False)
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        _write(tmp, "a.txt", "half")
        raise RuntimeError("crash half-way")
    assert (out / "a.txt").read_text() == "first"
    with atomic_output_dir(out, overwrite=True) as tmp:
        _write(tmp, "b.txt", "second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old directories left


def test_empty_existing_directory_is_accepted(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        _write(tmp, "a.txt", "x")
    assert (tmp_path / "out" / "a.txt").read_text() == "x"


def test_publish_without_replace_keeps_the_existing_directory(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    _write(target, "theirs.txt", "theirs")
    with staging_dir(target) as tmp:
        _write(tmp, "ours.txt", "ours")
        with pytest.raises(OSError):
            publish_dir(tmp, target, replace=False)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_publish_puts_the_old_directory_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old.txt", "old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith("staged"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    (tmp_path / "staged").mkdir()
    with pytest.raises(OSError, match="disk full"):
        publish_dir(tmp_path / "staged", target)
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staged"]


def test_atomic_write_text_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        atomic_write_text(path, "three")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_overwrite_replaces_only_directories_we_wrote(tmp_path):
    """A non-empty directory without our marker is never replaced, --overwrite or not; ours is."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _write(foreign, "paper.tex", "precious")
    with pytest.raises(FileExistsError, match=f"did not write.*{MARKER}"):
        check_output_dir(foreign, overwrite=True)
    with pytest.raises(FileExistsError), atomic_output_dir(foreign, overwrite=True) as tmp:
        _write(tmp, "a.txt", "x")
    assert sorted(p.name for p in foreign.iterdir()) == ["paper.tex"]
    ours = tmp_path / "ours"
    with atomic_output_dir(ours) as tmp:
        _write(tmp, "a.txt", "first")
    assert json.loads((ours / MARKER).read_text())["written_by"] == "sparse-expansion-plugin"
    with atomic_output_dir(ours, overwrite=True) as tmp:
        _write(tmp, "a.txt", "second")
    assert (ours / "a.txt").read_text() == "second"


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_output_dir(out) as tmp:
        _write(tmp, "a.txt", "ours")
        out.mkdir()
        _write(out, "theirs.txt", "written by someone else meanwhile")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


@pytest.mark.parametrize(
    "where, message",
    [
        ("cwd", "is the current working directory"),
        ("cwd_parent", "is a parent of the current working directory"),
        ("home", "is your home directory"),
        ("home_parent", "is a parent of your home directory"),
        ("root", "filesystem root"),
        ("model", "is the input model's directory"),
        ("model_parent", "is a parent of the input model's directory"),
        ("cache", "is the package's model cache"),
        ("in_cache", "inside the package's model cache"),
    ],
)
def test_protected_locations_are_refused_even_when_marked_ours(tmp_path, monkeypatch, where, message):
    """Protected places are refused before anything else: even our marker does not make them replaceable."""
    work, home, model, cache = (tmp_path / n for n in ("work", "users/me", "models/tiny", "cache"))
    for d in (work, home, model, cache / "smollm2"):
        d.mkdir(parents=True)
        (d / MARKER).write_text("{}")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(cache))
    path = {
        "cwd": ".",
        "cwd_parent": "..",
        "home": "~",
        "home_parent": str(home.parent),
        "root": "/",
        "model": str(model),
        "model_parent": str(model.parent),
        "cache": str(cache),
        "in_cache": str(cache / "smollm2"),
    }[where]
    with pytest.raises(FileExistsError, match=message):
        check_output_dir(path, overwrite=True, inputs=[str(model)])
    with pytest.raises(FileExistsError, match=message), atomic_output_dir(path, True, inputs=[str(model)]):
        pass
    for d in (work, home, model, cache / "smollm2"):
        assert (d / MARKER).is_file()


def test_unwritable_output_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)
    # /proc refuses new entries even for root (chmod would not stop root).
    with pytest.raises(PermissionError, match="not writable"):
        check_output_dir("/proc/sparse_expansion_out", overwrite=False)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_a_killed_run_are_cleaned_on_the_next_run(tmp_path):
    """Left by a killed run (old, pid gone or legacy name): removed; a live or foreign one: kept."""
    past = time.time() - 3600
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".out.tmp-{dead}-abcd1234", ".out.tmp-k2j4h5g6", f".out.old-{dead}-zz"]
    kept = [f".out.tmp-{alive}-abcd1234", ".other.tmp-k2j4h5g6", "out.tmp-k2j4h5g6", ".out.tmp-fresh123"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        _write(tmp_path / name, "half.bin", "half-written")
        if name != ".out.tmp-fresh123":
            os.utime(tmp_path / name, (past, past))
    (tmp_path / f".r.json.{dead}-0a1b2c3d.tmp").write_text("half")
    os.utime(tmp_path / f".r.json.{dead}-0a1b2c3d.tmp", (past, past))
    with atomic_output_dir(tmp_path / "out") as tmp:
        _write(tmp, "a.txt", "x")
    atomic_write_text(tmp_path / "r.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "out", "r.json"])


def test_a_previous_output_caught_between_the_two_renames_is_put_back(tmp_path):
    """Killed after moving the old output aside and before renaming the new one in: the old one returns."""
    past = time.time() - 3600
    old = tmp_path / f".out.old-{_dead_pid()}-abc"
    (old / "previous").mkdir(parents=True)
    _write(old / "previous", "model.bin", "the previous output")
    os.utime(old, (past, past))
    assert clean_stale_siblings(tmp_path / "out") == [old]
    assert (tmp_path / "out" / "model.bin").read_text() == "the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
