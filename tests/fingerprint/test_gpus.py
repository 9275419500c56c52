"""NVML inventory (the Environment probe, the fingerprint) against a stand-in pynvml module."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from builder.core import environment, nvml
from builder.core.environment import Capability, Environment, Gpu
from builder.instance import fingerprint


def fake_pynvml(cards: list[tuple[bytes | str, tuple[int, int], int]], fail_at: int | None = None,
                init_error: Exception | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.shutdowns = 0  # type: ignore[attr-defined]

    def init() -> None:
        if init_error:
            raise init_error

    def handle(i: int) -> int:
        if i == fail_at:
            raise RuntimeError("GPU is lost")
        return i

    def shutdown() -> None:
        mod.shutdowns += 1  # type: ignore[attr-defined]

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: b"580.159.04"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(cards)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: cards[h][0]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: cards[h][1]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=cards[h][2] << 20)  # type: ignore[attr-defined]
    return mod


CARDS = [(b"NVIDIA H100 80GB HBM3", (9, 0), 81559), ("NVIDIA GeForce RTX 4090", (8, 9), 24564)]


def test_inventory_decodes_names_and_shuts_nvml_down(monkeypatch):
    mod = fake_pynvml(CARDS)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    facts = nvml.inventory()
    assert facts == {"driver": "580.159.04", "gpus": [
        {"compute_capability": "9.0", "memory_mib": 81559, "name": "NVIDIA H100 80GB HBM3"},
        {"compute_capability": "8.9", "memory_mib": 24564, "name": "NVIDIA GeForce RTX 4090"}]}
    assert mod.shutdowns == 1
    found = environment.probe_gpus()
    assert found == ((Gpu("NVIDIA H100 80GB HBM3", Capability(9, 0), 81559),
                      Gpu("NVIDIA GeForce RTX 4090", Capability(8, 9), 24564)), "580.159.04")
    env = Environment.probe(torch=False)
    assert fingerprint.machine_facts(env) == facts


def test_a_failure_part_way_is_kept_and_platform_falls_back(monkeypatch, tmp_path):
    mod = fake_pynvml(CARDS, fail_at=1)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    facts = nvml.inventory()
    assert facts["error"] == "RuntimeError: GPU is lost" and len(facts["gpus"]) == 1 and mod.shutdowns == 1
    # the probe does not trust a half inventory: it asks nvidia-smi (here: a stand-in on PATH)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04, 81559, 9.0'\n"
                   "echo 'NVIDIA GeForce RTX 4090, 580.159.04, 24564, [N/A]'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert environment.probe_gpus() == ((Gpu("NVIDIA H100 80GB HBM3", Capability(9, 0), 81559),
                                         Gpu("NVIDIA GeForce RTX 4090", Capability(8, 9), 24564)), "580.159.04")
    # an nvidia-smi too old for the compute_cap field: names and memory, capabilities from the table
    smi.write_text("#!/bin/sh\ncase \"$1\" in *compute_cap*) echo 'Field \"compute_cap\" is not a valid field'; "
                   "exit 2;; esac\necho 'Tesla V100-SXM2-32GB, 470.82.01, 32510'\n")
    assert environment.probe_gpus() == ((Gpu("Tesla V100-SXM2-32GB", Capability(7, 0), 32510),), "470.82.01")
    smi.unlink()
    assert environment.probe_gpus() == ((), "")


@pytest.mark.parametrize("missing", ["module", "driver"])
def test_no_nvml(monkeypatch, missing):
    if missing == "module":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=OSError("libnvidia-ml.so.1")))
    assert nvml.inventory() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    assert fingerprint.machine_facts(Environment.probe(torch=False)) == {"driver": None, "gpus": []}
