"""outputs.py: the one temp-then-rename helper every command, the saver and the model cache use."""

from __future__ import annotations

import os

import pytest

from sparse_expansion_plugin.outputs import (
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
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
    assert [p.name for p in out.iterdir()] == ["b.txt"]
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
