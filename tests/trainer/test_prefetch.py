"""trainer/model/prefetch.py: which files a model's start reads ahead, that it reads them whole, and when it reads
nothing (weights larger than half the memory available, a second process of the node, a model not on disk)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer.config import ModelConfig
from trainer.model import hub, prefetch


def _model(folder: Path, files: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name, size in files.items():
        (folder / name).write_bytes(b"w" * size)
    return folder


def _wait(warm: prefetch.Prefetch) -> prefetch.Prefetch:
    deadline = time.monotonic() + 30
    while not warm.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert warm.done()
    return warm


def test_a_local_models_safetensors_are_read_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    folder = _model(tmp_path / "m", {"a.safetensors": 3 * prefetch.CHUNK + 5, "b.safetensors": 7,
                                     "old.bin": 11, "tokenizer.json": 13})
    cfg = ModelConfig(name=str(folder))
    assert [p.name for p in prefetch.weight_files(cfg)] == ["a.safetensors", "b.safetensors"]  # not .bin beside
    warm = _wait(prefetch.start_prefetch(cfg, threads=2, available=1 << 40, libraries=[]))
    assert warm.total_bytes == warm.read_bytes == 3 * prefetch.CHUNK + 12 and warm.seconds is not None


def test_bin_weights_when_there_are_no_safetensors_and_a_cached_hub_snapshot(tmp_path: Path, monkeypatch) -> None:
    folder = _model(tmp_path / "snapshot", {"pytorch_model.bin": 10})
    assert [p.name for p in prefetch.weight_files(ModelConfig(name=str(folder)))] == ["pytorch_model.bin"]
    monkeypatch.setattr(hub, "cached_config", lambda name, revision: str(folder / "config.json"))
    monkeypatch.setattr(prefetch, "cached_config", hub.cached_config)
    assert [p.name for p in prefetch.weight_files(ModelConfig(name="Org/Model"))] == ["pytorch_model.bin"]
    monkeypatch.setattr(prefetch, "cached_config", lambda name, revision: None)  # not downloaded yet: nothing
    assert prefetch.weight_files(ModelConfig(name="Org/Model")) == []
    assert prefetch.weight_files(ModelConfig(name="modelscope://Org/Model")) == []


def test_nothing_is_read_when_it_would_crowd_memory_or_on_a_second_process(tmp_path: Path, monkeypatch) -> None:
    folder = _model(tmp_path / "m", {"a.safetensors": 1000})
    cfg = ModelConfig(name=str(folder))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert prefetch.start_prefetch(cfg, available=1999, libraries=[]) is None  # more than half of what is available
    assert prefetch.start_prefetch(cfg, available=2000, libraries=[]) is not None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert prefetch.start_prefetch(cfg, available=1 << 40, libraries=[]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert prefetch.start_prefetch(ModelConfig(name=str(tmp_path / "absent")), available=1 << 40,
                                   libraries=[]) is None


def test_libraries_are_read_first_and_the_weights_left_out_when_both_do_not_fit(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = ModelConfig(name=str(_model(tmp_path / "m", {"a.safetensors": 1000})))
    lib = tmp_path / "libtorch_cuda.so"
    lib.write_bytes(b"l" * 500)
    warm = _wait(prefetch.start_prefetch(cfg, available=3000, libraries=[lib]))
    assert warm.files[0] == lib and (warm.total_bytes, warm.library_bytes, warm.read_bytes) == (1500, 500, 1500)
    warm = _wait(prefetch.start_prefetch(cfg, available=2999, libraries=[lib]))  # the libraries alone fit
    assert warm.files == [lib] and warm.total_bytes == warm.library_bytes == 500
    assert prefetch.start_prefetch(cfg, available=999, libraries=[lib]) is None  # neither
    assert _wait(prefetch.start_prefetch(ModelConfig(name=str(tmp_path / "absent")), available=1 << 40,
                                         libraries=[lib])).files == [lib]  # a model not on disk yet


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
    assert prefetch.library_files(roots) == [big, small, cudnn, bnb]
    assert prefetch.library_files({}) == []


def test_the_libraries_of_the_torch_here_are_found_without_importing_anything_new() -> None:
    import subprocess
    import sys

    code = ("import sys; from trainer.model.prefetch import library_files; files = library_files(); "
            "print(any(f.name.startswith('libtorch') for f in files), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:     300 kB\n")
    assert prefetch.available_bytes(meminfo) == 300 * 1024
    meminfo.write_text("MemTotal: 1000 kB\n")
    assert prefetch.available_bytes(meminfo) is None
    assert prefetch.available_bytes(tmp_path / "none") is None


@pytest.mark.parametrize("sendfile", [True, False] if prefetch.SENDFILE else [False])
def test_both_ways_read_every_segment_once(tmp_path: Path, monkeypatch, sendfile: bool) -> None:
    monkeypatch.setattr(prefetch, "SENDFILE", sendfile)
    monkeypatch.setattr(prefetch, "SEGMENT", 1000)
    folder = _model(tmp_path / "m", {"a.safetensors": 2500, "b.safetensors": 10})
    warm = _wait(prefetch.Prefetch([folder / "a.safetensors", folder / "b.safetensors"], 2510).start(threads=2))
    assert warm.read_bytes == 2510


def test_stop_ends_the_readers_early(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prefetch, "SENDFILE", False)
    monkeypatch.setattr(prefetch, "CHUNK", 1)  # one byte per read: far from done when stopped
    folder = _model(tmp_path / "m", {"a.safetensors": 5_000_000})
    warm = prefetch.Prefetch([folder / "a.safetensors"], 5_000_000)
    warm.stop()
    warm.start(threads=1)
    _wait(warm)
    assert warm.read_bytes < warm.total_bytes


def test_one_large_file_is_read_by_every_thread_in_segments(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prefetch, "SENDFILE", False)
    monkeypatch.setattr(prefetch, "SEGMENT", 1000)
    monkeypatch.setattr(prefetch, "CHUNK", 300)
    folder = _model(tmp_path / "m", {"model.safetensors": 4321})
    warm = prefetch.Prefetch([folder / "model.safetensors"], 4321).start(threads=3)
    assert len(warm._threads) == 3  # five segments, three readers
    _wait(warm)
    assert warm.read_bytes == 4321
