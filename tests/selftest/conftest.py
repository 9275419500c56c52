"""Readings fixtures: recorded from GPU machines (tests/fixtures/nvml/) and edited copies for each fault."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from builder.core import nvml
from builder.selftest import allreduce, env_probes, gpu_probes, kernel_probes, readings
from builder.selftest.findings import Finding
from builder.selftest.registry import judge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nvml"


def load_readings(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def healthy() -> dict[str, Any]:
    """A healthy H100's quick-mode readings (a fresh deep copy: tests edit it to inject one fault)."""
    return copy.deepcopy(load_readings("healthy_quick"))


@pytest.fixture
def healthy_full() -> dict[str, Any]:
    return copy.deepcopy(load_readings("healthy_full"))


def findings(readings: dict[str, Any], check: str) -> list[Finding]:
    found = [f for f in judge(readings) if f.check == check]
    assert found, f"check {check} reported nothing"
    return found


def only(readings: dict[str, Any], check: str) -> Finding:
    found = findings(readings, check)
    assert len(found) == 1, found
    return found[0]


def severities(readings: dict[str, Any], check: str) -> list[str]:
    return [f.severity for f in findings(readings, check)]


def assert_fault_caught(readings: dict[str, Any], fault: tuple[Any, ...]) -> None:
    """A FAULTS-table row (id, edit, check, severity, message text, remediation text): apply the edit to
    ``readings``; the check must report that severity with that text and say what to do."""
    _, edit, check, severity, message, remediation = fault
    edit(readings)
    found = findings(readings, check)
    hits = [f for f in found if f.severity == severity and message in f.message]
    assert hits, found
    assert remediation in hits[0].remediation
    if severity in ("fail", "warn"):
        assert hits[0].remediation, "every fail and warn says what to do"


Edit = Callable[[dict[str, Any]], None]


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
    monkeypatch.setattr(nvml, "read_nvml", probe("nvml", {}))
    monkeypatch.setattr(gpu_probes, "torch_info", probe("torch", torch))
    for name in ("matmul_accuracy", "bandwidth", "memory_pattern", "repeatability"):
        monkeypatch.setattr(gpu_probes, name, probe(name, {}))
    monkeypatch.setattr(gpu_probes, "sustained_load", probe("load", {}, seconds=0.2))
    monkeypatch.setattr(allreduce, "prepare", lambda *a: probe("allreduce", {"world_size": 1}))
    monkeypatch.setattr(kernel_probes, "flash_attn", probe("flash_attn"))
    for name in ("bitsandbytes", "sdpa_backends", "fused_layers", "lora_smoke"):
        monkeypatch.setattr(kernel_probes, name, probe(name, {}))
    for name in ("shm", "hf_cache"):
        monkeypatch.setattr(env_probes, name, probe(name, {}))
    monkeypatch.setattr(env_probes, "data_dir", probe("data_dir", {}))
    monkeypatch.setattr(env_probes, "lockfile_reading", probe("lockfile", {}))
    monkeypatch.setattr(readings, "_import_quietly", lambda module: calls.append(f"import {module}"))
    return calls

