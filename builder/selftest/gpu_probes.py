"""Live torch measurements on the GPU -> plain readings: identity, numerics, speed, memory, sustained load.

Each probe returns a JSON-ready dict and never decides anything; the checks judge the numbers. A probe that
raises is recorded by the collector as ``{"probe_error": ...}``, which the checks also judge.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from builder.core import nvml
from builder.core.environment import probe_torch


def torch_info() -> dict[str, Any]:
    """torch's version, its CUDA, the GPUs it sees and the SASS architectures compiled into it, as the Environment
    probe (builder/core/environment.py) reports them."""
    build = probe_torch(devices=True)
    if build is None or build.error:
        return {"available": False, "error": build.error if build else "torch is not installed"}
    return {
        "import_s": build.import_s,
        "available": True,
        "version": build.version,
        "cuda": build.cuda,
        "cuda_available": bool(build.cuda_available),
        "device_count": len(build.devices),
        "devices": [{"name": d.name, "capability": d.capability.as_list(), "total_memory": d.total_memory,
                     "multi_processor_count": d.multi_processor_count} for d in build.devices],
        "arch_list": list(build.arch_list) if build.cuda_available else [],
    }


def use_local_rank() -> dict[str, Any]:
    """Under torchrun: make LOCAL_RANK's GPU this process's CUDA device, so each rank tests its own."""
    import os

    import torch

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return {"device": torch.cuda.current_device()}


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def matmul_accuracy(n: int = 2048) -> dict[str, Any]:
    """Max relative error of bf16 and fp16 matmuls against an fp64 reference (normalised by the reference's
    largest magnitude, so cancellation near zero does not dominate)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.float64, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.float64, generator=g)
    out: dict[str, Any] = {"n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ad, bd = a.to(dtype), b.to(dtype)
        ref = ad.double() @ bd.double()  # reference over the same rounded inputs: only the matmul is judged
        got = (ad @ bd).double()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        out[name] = {"max_rel_error": err, "finite": bool(torch.isfinite(got).all().item())}
    return out


def matmul_tflops(seconds: float = 1.5, n: int = 8192) -> dict[str, Any]:
    """Sustained dense bf16 TFLOP/s over ``seconds`` of back-to-back n x n x n matmuls (after a warm-up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        _sync()
        iters += 10
    elapsed = time.perf_counter() - start
    return {"n": n, "iterations": iters, "seconds": elapsed, "tflops": 2 * n**3 * iters / elapsed / 1e12}


def bandwidth(mib: int = 512, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy and pinned host-to-device bandwidth in GB/s."""
    import torch

    numel = mib * 2**20 // 4
    src = torch.empty(numel, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    host = torch.empty(numel, dtype=torch.float32).pin_memory()
    result: dict[str, Any] = {"mib": mib}
    for name, copy, factor in (
        ("d2d_gbps", lambda: dst.copy_(src), 2),
        ("h2d_pinned_gbps", lambda: dst.copy_(host), 1),
    ):
        copy()
        _sync()
        start = time.perf_counter()
        for _ in range(repeats):
            copy()
        _sync()
        # d2d reads and writes every byte: count both, as bandwidth tests do.
        result[name] = factor * src.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9
    return result


def memory_pattern(fraction: float = 0.85, chunk_mib: int = 1024) -> dict[str, Any]:
    """Fill most of the free memory with 0101..., 1010..., then an address-dependent pattern (offset in the
    chunk + chunk index), read each back and count the words that differ."""
    import torch

    torch.cuda.empty_cache()  # memory cached by earlier probes counts as free here
    free, _ = torch.cuda.mem_get_info()
    chunk = chunk_mib * 2**20 // 4
    offsets = torch.arange(chunk, device="cuda", dtype=torch.int32)
    chunks: list[Any] = []
    try:
        # Leave room for one comparison temporary (a chunk of bools) beside the chunks.
        while (len(chunks) + 2) * chunk * 4 < free * fraction:
            chunks.append(torch.empty(chunk, device="cuda", dtype=torch.int32))
        mismatches = 0
        for pattern in (0x55555555, -0x55555556, None):
            for i, t in enumerate(chunks):
                if pattern is None:
                    torch.add(offsets, i, out=t)
                else:
                    t.fill_(pattern)
            torch.cuda.synchronize()
            for i, t in enumerate(chunks):
                expect = offsets + i if pattern is None else pattern
                mismatches += int((t != expect).sum().item())
        return {"bytes_tested": len(chunks) * chunk * 4, "free_bytes": int(free), "mismatches": mismatches}
    finally:
        del chunks, offsets
        torch.cuda.empty_cache()


def repeatability(repeats: int = 20, n: int = 4096) -> dict[str, Any]:
    """A fixed-seed matmul repeated: every result must be bit-identical (else silent data corruption)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1234)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    first = a @ b
    differing = sum(int(not torch.equal(a @ b, first)) for _ in range(repeats))
    return {"repeats": repeats, "differing": differing}


class NvmlSampler:
    """Samples NVML's fast-changing values on a background thread while a load runs."""

    def __init__(self, index: int = 0, period: float = 0.25) -> None:
        self.index, self.period = index, period
        self.samples: list[dict[str, Any]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            n = nvml._nvml()
            n.nvmlInit()
        except Exception as e:  # no driver, no pynvml: the load still runs, the checks say n/a
            self.error = str(e)
            return
        try:
            h = n.nvmlDeviceGetHandleByIndex(self.index)
            while not self._stop.is_set():
                self.samples.append(nvml.sample(n, h))
                self._stop.wait(self.period)
        finally:
            n.nvmlShutdown()

    def __enter__(self) -> NvmlSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _matmul_graph(a: Any, b: Any, out: Any, count: int) -> tuple[Any, str | None]:
    """(a CUDA graph of ``count`` back-to-back ``a @ b`` into ``out``, None), or (None, why) where capture fails:
    the caller then launches the matmuls one by one."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS picks its kernel and workspace here
            for _ in range(3):
                torch.matmul(a, b, out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the threads importing kernel libraries meanwhile may make CUDA calls a global capture
            # forbids (theirs would fail, and so would this capture)
            capture = torch.cuda.graph(graph, capture_error_mode="thread_local")
        except TypeError:  # a torch before capture_error_mode
            capture = torch.cuda.graph(graph)
        with capture:
            for _ in range(count):
                torch.matmul(a, b, out=out)
        return graph, None
    except Exception as e:  # an old torch or driver without graph capture: plain launches
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def sustained_load(seconds: float, n: int = 8192, graph_matmuls: int = 50) -> dict[str, Any]:
    """bf16 matmuls for ``seconds`` with NVML sampled throughout; TFLOP/s per second-long window.

    The matmuls are replayed from a CUDA graph of ``graph_matmuls`` (one host call launches them all: ~80 ms of an
    H100's work, longer than a thread loading a shared library holds the GIL), and each
    window queues a second's worth of replays and syncs once, timed on the GPU with CUDA events. The quick
    self-test imports kernel libraries on other threads meanwhile, and a thread loading a shared library holds the
    GIL: launching matmuls one by one, the host fell behind the GPU, which idled between them (an H200 measured
    175-435 TFLOP/s over 19-50% utilisation, and failed a healthy machine's preflight), and by the host clock an
    H100 measured 495 instead of ~700. The first window learns the rate (replays synced one by one).
    """
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    graph, graph_error = _matmul_graph(a, b, out, graph_matmuls)
    per_launch = graph_matmuls if graph is not None else 1

    def launch() -> None:
        if graph is not None:
            graph.replay()
        else:
            torch.matmul(a, b, out=out)

    windows: list[float] = []
    host_windows: list[float] = []
    per_second = 0
    with NvmlSampler() as sampler:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            w0, launches = time.perf_counter(), 0
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if per_second:
                launch()  # a lead launch, not counted: the window's clock starts once the GPU has work queued
            begin.record()
            if per_second:
                for _ in range(per_second):
                    launch()
                launches = per_second
            while time.perf_counter() - w0 < 1.0 and not per_second:
                launch()
                _sync()
                launches += 1
            end.record()
            end.synchronize()
            elapsed = time.perf_counter() - w0
            gpu_seconds = begin.elapsed_time(end) / 1000
            flops = 2 * n**3 * launches * per_launch
            windows.append(flops / (gpu_seconds if gpu_seconds > 0 else elapsed) / 1e12)
            host_windows.append(flops / elapsed / 1e12)
            # Under 1,000 launches (of a graph or a matmul) a window: a second's worth, and never enough to block.
            per_second = min(1000, max(1, round(launches / elapsed)))
    return {
        "seconds": seconds,
        "tflops_windows": windows,
        "host_clock_tflops_windows": host_windows,
        "cuda_graph": graph is not None,
        "cuda_graph_error": graph_error,
        "samples": sampler.samples,
        "sampler_error": sampler.error,
    }
