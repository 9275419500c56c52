"""The collector's plan on a GPU machine, with every probe replaced by a recorder (no GPU here): which probes run,
in what order around the timed load, with which flash-attn features, and what a kernel the job does not use reads."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from builder.selftest import (
    allreduce,
    checks_kernels,
    env_probes,
    gpu_probes,
    kernel_probes,
    nvml_reader,
    readings,
)
from builder.selftest.model import attention_needs


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replaces each live probe with one that records its name (and holds the load for 0.2 s)."""
    calls: list[str] = []
    lock = threading.Lock()

    def probe(name: str, result: Any = None, seconds: float = 0.0):
        def run(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            with lock:
                calls.append(name)
            return {"args": list(args), **kwargs} if result is None else result
        return run

    torch = {"available": True, "cuda_available": True, "device_count": 1, "version": "2.11.0+cu130"}
    monkeypatch.setattr(nvml_reader, "read_nvml", probe("nvml", {}))
    monkeypatch.setattr(gpu_probes, "torch_info", probe("torch", torch))
    for name in ("matmul_accuracy", "bandwidth", "memory_pattern", "repeatability"):
        monkeypatch.setattr(gpu_probes, name, probe(name, {}))
    monkeypatch.setattr(gpu_probes, "sustained_load", probe("load", {}, seconds=0.2))
    monkeypatch.setattr(allreduce, "prepare", lambda *a: probe("allreduce", {"world_size": 1}))
    monkeypatch.setattr(kernel_probes, "flash_attn", probe("flash_attn"))
    for name in ("bitsandbytes", "sdpa_backends", "lora_smoke"):
        monkeypatch.setattr(kernel_probes, name, probe(name, {}))
    for name in ("shm", "hf_cache"):
        monkeypatch.setattr(env_probes, name, probe(name, {}))
    monkeypatch.setattr(env_probes, "data_dir", probe("data_dir", {}))
    monkeypatch.setattr(env_probes, "lockfile_reading", probe("lock", {}))
    monkeypatch.setattr(readings, "_import_quietly", lambda module: calls.append(f"import {module}"))
    return calls


def test_quick_checks_the_environment_before_the_load_and_imports_only_the_jobs_kernels(recorder) -> None:
    r = readings.collect("quick", attention_needs(None), "/data", kernels=("sdpa", "bitsandbytes"))
    assert recorder.index("data_dir") < recorder.index("load") < recorder.index("bandwidth")
    assert "import bitsandbytes" in recorder and "import flash_attn" not in recorder and "flash_attn" not in recorder
    assert r["gpu"]["flash_attn"] == readings.NOT_NEEDED and r["kernels"] == ["sdpa", "bitsandbytes"]
    (finding,) = checks_kernels.flash_attn(r)
    assert finding.severity == "n/a" and "not tested, the job does not use it" in finding.message
    assert {"load", "import_bitsandbytes", "env", "data_dir"} <= set(r["timings"])


def test_quick_calls_flash_attn_only_with_the_features_the_model_needs(recorder, tmp_path) -> None:
    r = readings.collect("quick", attention_needs(None))
    assert r["gpu"]["flash_attn"]["args"][-1] == ()
    config = tmp_path / "config.json"
    config.write_text('{"head_dim": 128, "sliding_window": 4096, "num_attention_heads": 8}')
    r = readings.collect("quick", attention_needs(str(config)))
    assert r["gpu"]["flash_attn"]["args"][-1] == ("local",)
    r = readings.collect("full", attention_needs(None))
    assert r["gpu"]["flash_attn"]["args"][-1] == kernel_probes.FLASH_ATTN_FEATURES


def test_full_hashes_the_environment_after_the_gpus_speed_is_measured(recorder) -> None:
    readings.collect("full", attention_needs(None), "/data")
    assert recorder.index("bandwidth") < recorder.index("lock")
    assert {"import transformers", "import peft"} <= set(recorder)
