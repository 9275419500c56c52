"""sustained_load judges the GPU by what it can do: a host slowed by another thread (one loading a kernel library
holds the GIL) must not make a healthy GPU look slow. A stand-in torch simulates the host's and the GPU's clocks:
every host launch costs ``launch_stall`` seconds, and the GPU cannot start a kernel before it is launched."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest

from builder.selftest import gpu_probes

GPU_TFLOPS = 700.0
N = 8192
SECONDS_PER_MATMUL = 2 * N**3 / (GPU_TFLOPS * 1e12)  # ~1.6 ms


class FakeClock:
    def __init__(self, launch_stall: float, sync_stall: float) -> None:
        self.now, self.gpu_end = 0.0, 0.0
        self.launch_stall, self.sync_stall = launch_stall, sync_stall
        self.capturing: list[int] | None = None  # matmuls recorded into the graph being captured

    def perf_counter(self) -> float:
        return self.now

    def launch(self, kernels: int) -> None:
        self.now += self.launch_stall
        self.gpu_end = max(self.gpu_end, self.now) + kernels * SECONDS_PER_MATMUL

    def sync(self) -> None:
        self.now = max(self.now, self.gpu_end) + self.sync_stall


def fake_torch(clock: FakeClock, graphs: bool, old_torch: bool = False) -> types.ModuleType:
    class Matrix:
        def __matmul__(self, other: object) -> Matrix:
            return matmul(self, other)

    def matmul(a: object, b: object, out: object = None) -> Matrix:
        if clock.capturing is not None:
            clock.capturing.append(1)
        else:
            clock.launch(1)
        return Matrix()

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at = 0.0

        def record(self) -> None:  # reached once the GPU has done the work queued before it
            self.at = max(clock.gpu_end, clock.now)

        def synchronize(self) -> None:
            clock.sync()

        def elapsed_time(self, other: Event) -> float:
            return (other.at - self.at) * 1000

    class Graph:
        def __init__(self) -> None:
            if not graphs:
                raise RuntimeError("CUDA graphs are not supported here")
            self.kernels = 0

        def replay(self) -> None:
            clock.launch(self.kernels)

    @contextlib.contextmanager
    def capturing(graph: Graph):
        clock.capturing = []
        yield
        graph.kernels, clock.capturing = len(clock.capturing), None

    def capture(graph: Graph, **kw: str):
        if old_torch and kw:
            raise TypeError("graph() got an unexpected keyword argument 'capture_error_mode'")
        # other threads import kernel libraries meanwhile: a global capture would forbid their CUDA calls
        assert old_torch or kw == {"capture_error_mode": "thread_local"}
        return capturing(graph)

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    torch = types.ModuleType("torch")
    torch.randn = lambda *a, **k: Matrix()  # type: ignore[attr-defined]
    torch.empty = lambda *a, **k: Matrix()  # type: ignore[attr-defined]
    torch.matmul = matmul  # type: ignore[attr-defined]
    torch.bfloat16 = "bf16"  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Event=Event, synchronize=clock.sync, Stream=Stream, current_stream=Stream,
        stream=lambda s: contextlib.nullcontext(), CUDAGraph=Graph, graph=capture)
    return torch


class Sampler:
    samples: list = []
    error = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def load_with(monkeypatch: pytest.MonkeyPatch, launch_stall: float, sync_stall: float, graphs: bool,
              old_torch: bool = False) -> dict:
    clock = FakeClock(launch_stall, sync_stall)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(clock, graphs, old_torch))
    monkeypatch.setattr(gpu_probes.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(gpu_probes, "NvmlSampler", Sampler)
    return gpu_probes.sustained_load(3.0, n=N)


@pytest.mark.parametrize("launch_stall,sync_stall,old_torch", [
    (0.0, 0.0, False), (0.0, 0.2, False), (0.005, 0.0, False), (0.005, 0.2, True), (0.05, 0.0, False)])
def test_a_busy_host_does_not_make_the_gpu_look_slow(monkeypatch: pytest.MonkeyPatch, launch_stall: float,
                                                    sync_stall: float, old_torch: bool) -> None:
    """Up to a 50 ms stall per launch (a thread loading a shared library holds the GIL that long): one replay of
    the graph keeps the GPU busy for ~80 ms."""
    load = load_with(monkeypatch, launch_stall, sync_stall, graphs=True, old_torch=old_torch)
    assert load["cuda_graph"] is True and load["cuda_graph_error"] is None
    judged = load["tflops_windows"][1:]
    assert judged and all(w == pytest.approx(GPU_TFLOPS, rel=0.05) for w in judged)
    if sync_stall:  # the host clock alone would have called this GPU slow
        assert max(load["host_clock_tflops_windows"][1:]) < 0.9 * GPU_TFLOPS


def test_without_graphs_matmuls_are_launched_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback still measures an idle host right; a host that stalls 5 ms per launch starves the GPU (what
    the graph replays are for: one launch keeps it busy for 50 matmuls)."""
    idle = load_with(monkeypatch, 0.0, 0.0, graphs=False)
    assert idle["cuda_graph"] is False and "not supported" in idle["cuda_graph_error"]
    assert all(w == pytest.approx(GPU_TFLOPS, rel=0.05) for w in idle["tflops_windows"][1:])
    starved = load_with(monkeypatch, 0.005, 0.0, graphs=False)
    assert max(starved["tflops_windows"][1:]) < 0.5 * GPU_TFLOPS


def test_the_finding_says_when_the_load_ran_without_a_graph(healthy) -> None:
    from builder.selftest import checks_numerics

    healthy["load"].update(cuda_graph=False, cuda_graph_error="RuntimeError: capture failed")
    finding = checks_numerics.matmul_tflops(healthy)
    assert "launched one at a time" in finding.message and "capture failed" in finding.message
    healthy["load"].update(cuda_graph=True, cuda_graph_error=None)
    assert "one at a time" not in checks_numerics.matmul_tflops(healthy).message
