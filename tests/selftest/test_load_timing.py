"""sustained_load judges the GPU by GPU time: a host clock slowed by another thread (one loading a kernel library
holds the GIL) must not make a healthy GPU look slow. A stand-in torch simulates the GPU's clock."""

from __future__ import annotations

import sys
import types

import pytest

from builder.instance.selftest import gpu_probes

GPU_TFLOPS = 700.0
N = 1024


class FakeClock:
    """Host time, advanced by hand; every sync also loses ``stall`` seconds (the GIL held elsewhere)."""

    def __init__(self, stall: float) -> None:
        self.now, self.stall, self.gpu = 0.0, stall, 0.0

    def perf_counter(self) -> float:
        return self.now


def fake_torch(clock: FakeClock) -> types.ModuleType:
    seconds_per_matmul = 2 * N**3 / (GPU_TFLOPS * 1e12)

    class Matrix:
        def __matmul__(self, other: object) -> Matrix:
            clock.gpu += seconds_per_matmul  # queued work: the GPU's clock runs, the host's barely
            clock.now += 1e-6
            return self

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at = 0.0

        def record(self) -> None:
            self.at = clock.gpu

        def synchronize(self) -> None:
            sync()

        def elapsed_time(self, other: Event) -> float:
            return (other.at - self.at) * 1000

    def sync() -> None:
        clock.now = max(clock.now, clock.gpu) + clock.stall
        clock.gpu = clock.now

    torch = types.ModuleType("torch")
    torch.randn = lambda *a, **k: Matrix()  # type: ignore[attr-defined]
    torch.bfloat16 = "bf16"  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(Event=Event, synchronize=sync)  # type: ignore[attr-defined]
    return torch


@pytest.mark.parametrize("stall", [0.0, 0.2])
def test_windows_are_timed_on_the_gpu(monkeypatch: pytest.MonkeyPatch, stall: float) -> None:
    clock = FakeClock(stall)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(clock))
    monkeypatch.setattr(gpu_probes.time, "perf_counter", clock.perf_counter)
    class Sampler:
        samples: list = []
        error = None

        def __enter__(self) -> Sampler:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(gpu_probes, "NvmlSampler", Sampler)
    load = gpu_probes.sustained_load(3.0, n=N)
    judged = load["tflops_windows"][1:]
    assert judged and all(w == pytest.approx(GPU_TFLOPS, rel=0.02) for w in judged)
    if stall:  # the host clock alone would have called this GPU slow
        assert max(load["host_clock_tflops_windows"][1:]) < 0.9 * GPU_TFLOPS
