"""trainer/model/prefetch.py: which files a model's start reads ahead, that it reads them whole, and when it reads
nothing (weights larger than half the memory available, a second process of the node, a model not on disk)."""

from __future__ import annotations

from pathlib import Path

from builder.core import readahead
from trainer.config import ModelConfig
from trainer.model import hub, prefetch


def _model(folder: Path, files: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name, size in files.items():
        (folder / name).write_bytes(b"w" * size)
    return folder


def _done(warm: prefetch.Prefetch) -> prefetch.Prefetch:
    assert warm.join(30).done()
    return warm


def test_a_local_models_safetensors_are_read_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    folder = _model(tmp_path / "m", {"a.safetensors": 3 * readahead.CHUNK + 5, "b.safetensors": 7,
                                     "old.bin": 11, "tokenizer.json": 13})
    cfg = ModelConfig(name=str(folder))
    assert [p.name for p in prefetch.weight_files(cfg)] == ["a.safetensors", "b.safetensors"]  # not .bin beside
    warm = _done(prefetch.start_prefetch(cfg, threads=2, available=1 << 40, libraries=[]))
    assert warm.total_bytes == warm.read_bytes == 3 * readahead.CHUNK + 12 and warm.seconds is not None


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


def test_libraries_are_read_first_and_what_does_not_fit_is_left_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = ModelConfig(name=str(_model(tmp_path / "m", {"a.safetensors": 1000})))
    lib = tmp_path / "libtorch_cuda.so"
    lib.write_bytes(b"l" * 500)
    warm = _done(prefetch.start_prefetch(cfg, available=3000, libraries=[lib]))  # both fit in half
    assert warm.files[0] == lib and (warm.total_bytes, warm.library_bytes, warm.read_bytes) == (1500, 500, 1500)
    warm = _done(prefetch.start_prefetch(cfg, available=2999, libraries=[lib]))  # not both: the weights
    assert [f.name for f in warm.files] == ["a.safetensors"] and warm.library_bytes == 0
    warm = _done(prefetch.start_prefetch(cfg, available=1999, libraries=[lib]))  # the libraries alone fit
    assert warm.files == [lib] and warm.total_bytes == warm.library_bytes == 500
    assert prefetch.start_prefetch(cfg, available=999, libraries=[lib]) is None  # neither
    assert _done(prefetch.start_prefetch(ModelConfig(name=str(tmp_path / "absent")), available=1 << 40,
                                         libraries=[lib])).files == [lib]  # a model not on disk yet
