"""Atomic writes: a reader sees the old file or the new one, never a half-written one, and no temp file stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from builder.core.fsutil import (
    atomic_path,
    check_creatable,
    pruned_if_left_empty,
    readable_files,
    remember,
    write_atomic,
)


def test_write_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.txt"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "cache.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_files_are_written_0644_like_the_rest(tmp_path: Path) -> None:
    """A GGUF (atomic_path), a library's 0600 files (safetensors) and the caches remember() keeps end up readable by
    all, as write_atomic's."""
    with atomic_path(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    write_atomic(tmp_path / "Modelfile", "FROM ./model.gguf\n")
    (tmp_path / "adapter").mkdir()
    private = tmp_path / "adapter" / "adapter_model.safetensors"
    private.write_bytes(b"x")
    private.chmod(0o600)
    readable_files(tmp_path / "adapter")
    assert remember(tmp_path / "torch-builds.json", {"builds": []})  # a region-shared cache other users read
    modes = {p.name: oct(p.stat().st_mode & 0o777)
             for p in (tmp_path / "model.gguf", tmp_path / "Modelfile", private, tmp_path / "torch-builds.json")}
    assert set(modes.values()) == {"0o644"}, modes


def test_pruned_if_left_empty_removes_only_what_it_made_and_left_empty(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with pruned_if_left_empty(tmp_path / "kept" / "new" / "deeper"):
            (tmp_path / "kept" / "new" / "deeper" / "sub").mkdir(parents=True)
            raise RuntimeError("a check failed")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pruned_if_left_empty(tmp_path / "made" / "out"):
        (tmp_path / "made" / "out").mkdir(parents=True)
        (tmp_path / "made" / "out" / "f").write_text("written")
    assert (tmp_path / "made" / "out" / "f").is_file()


def test_check_creatable_creates_nothing_and_names_what_is_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert check_creatable(tmp_path / "a" / "b" / "out", "--merge") == tmp_path / "a" / "b" / "out"
    assert not (tmp_path / "a").exists()
    with pytest.raises(SameboxError, match=f"--merge {blocker}/out: {blocker} is a file, not a directory"):
        check_creatable(blocker / "out", "--merge")
