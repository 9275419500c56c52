"""builder/core/readahead.py: background readers that warm files whole (both ways of reading), stop early, split a
large file among threads; the native libraries an import of torch maps, listed without importing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.core import readahead


def _files(folder: Path, files: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    for name, size in files.items():
        (folder / name).write_bytes(b"w" * size)
    return folder


def _done(warm: readahead.Prefetch) -> readahead.Prefetch:
    assert warm.join(30).done()
    return warm


def test_library_files_by_package_in_import_order_largest_first(tmp_path: Path) -> None:
    def lib(path: str, size: int) -> Path:
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * size)
        return f

    small, big = lib("torch/lib/libc10.so", 10), lib("torch/lib/libtorch_cuda.so", 99)
    cudnn = lib("nv/cudnn/lib/libcudnn.so.9", 50)
    lib("nv/cudnn/include/cudnn.h", 70)  # not a library
    (tmp_path / "torch/lib/libalias.so").symlink_to(big)  # read once, through its real name
    bnb = lib("bnb/libbitsandbytes_cuda130.so", 5)
    roots = {"bitsandbytes": [tmp_path / "bnb"], "nvidia": [tmp_path / "nv"], "torch": [tmp_path / "torch"]}
    assert readahead.library_files(roots) == [big, small, cudnn, bnb]
    assert readahead.library_files({}) == []


def test_the_libraries_of_the_torch_here_are_found_without_importing_anything_new() -> None:
    import subprocess
    import sys

    code = ("import sys; from builder.core.readahead import library_files; files = library_files(); "
            "print(any(f.name.startswith('libtorch') for f in files), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:     300 kB\n")
    assert readahead.available_bytes(meminfo) == 300 * 1024
    meminfo.write_text("MemTotal: 1000 kB\n")
    assert readahead.available_bytes(meminfo) is None
    assert readahead.available_bytes(tmp_path / "none") is None


@pytest.mark.parametrize("sendfile", [True, False] if readahead.SENDFILE else [False])
def test_both_ways_read_every_segment_once(tmp_path: Path, monkeypatch, sendfile: bool) -> None:
    monkeypatch.setattr(readahead, "SENDFILE", sendfile)
    monkeypatch.setattr(readahead, "SEGMENT", 1000)
    folder = _files(tmp_path / "m", {"a.safetensors": 2500, "b.safetensors": 10})
    warm = _done(readahead.Prefetch([folder / "a.safetensors", folder / "b.safetensors"], 2510).start(threads=2))
    assert warm.read_bytes == 2510


def test_stop_ends_the_readers_early(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readahead, "SENDFILE", False)
    monkeypatch.setattr(readahead, "CHUNK", 1)  # one byte per read: far from done when stopped
    folder = _files(tmp_path / "m", {"a.safetensors": 5_000_000})
    warm = readahead.Prefetch([folder / "a.safetensors"], 5_000_000)
    warm.stop()
    warm.start(threads=1)
    _done(warm)
    assert warm.read_bytes < warm.total_bytes and warm.stopped


def test_stop_can_wait_for_the_readers_and_says_whether_they_finished(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readahead, "SENDFILE", False)
    monkeypatch.setattr(readahead, "CHUNK", 1)
    folder = _files(tmp_path / "m", {"a.so": 3_000_000})
    warm = readahead.Prefetch([folder / "a.so"], 3_000_000).start(threads=2)
    warm.stop(wait=5.0)
    assert warm.done() and warm.seconds is not None and warm.stopped  # final numbers, and they say it was cut
    monkeypatch.setattr(readahead, "CHUNK", 1 << 16)
    whole = _done(readahead.Prefetch([folder / "a.so"], 3_000_000).start(threads=2))
    whole.stop(wait=1.0)
    assert not whole.stopped and whole.read_bytes == 3_000_000


def test_a_file_gone_before_the_readers_start_is_left_out(tmp_path: Path) -> None:
    folder = _files(tmp_path / "m", {"a.so": 10, "b.so": 20})
    warm = readahead.Prefetch([folder / "a.so", folder / "b.so"], 30)
    (folder / "a.so").unlink()
    assert _done(warm.start(threads=2)).read_bytes == 20


def test_one_large_file_is_read_by_every_thread_in_segments(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readahead, "SENDFILE", False)
    monkeypatch.setattr(readahead, "SEGMENT", 1000)
    monkeypatch.setattr(readahead, "CHUNK", 300)
    folder = _files(tmp_path / "m", {"model.safetensors": 4321})
    warm = readahead.Prefetch([folder / "model.safetensors"], 4321).start(threads=3)
    assert len(warm._threads) == 3  # five segments, three readers
    _done(warm)
    assert warm.read_bytes == 4321


def test_setup_reads_the_libraries_only_when_they_fit(tmp_path: Path) -> None:
    lib = tmp_path / "libtorch_cuda.so"
    lib.write_bytes(b"l" * 500)
    warm = _done(readahead.start_libraries(available=1000, libraries=[lib]))
    assert (warm.total_bytes, warm.library_bytes, warm.read_bytes) == (500, 500, 500)
    assert readahead.start_libraries(available=999, libraries=[lib]) is None
    assert readahead.start_libraries(available=1 << 40, libraries=[]) is None
