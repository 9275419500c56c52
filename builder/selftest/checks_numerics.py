"""Numerics and speed checks: half-precision matmul accuracy against fp64, sustained bf16 TFLOP/s against the
per-GPU reference in builder/core/compat.py, copy bandwidth, and (full mode) a memory pattern test, bit-identical
repeats of one matmul, and throughput steadiness over a long load."""

from __future__ import annotations

import statistics
from typing import Any

from builder.core import compat
from builder.selftest.findings import Finding, fail, gib, gpu_reading, no_gpu, nvml_devices, ok, probe_error, warn
from builder.selftest.probes import BANDWIDTH, LOAD, MATMUL_ACCURACY, MEMORY_PATTERN, REPEATABILITY, TORCH, Probe

# Max |error| / max |reference| of an n=2048 matmul over the same rounded inputs with fp32 accumulation: output
# rounding alone gives ~2**-9 for bf16 and ~2**-12 for fp16; these bounds leave about 4x headroom.
MATMUL_REL_ERROR = {"bf16": 1e-2, "fp16": 1e-3}
TFLOPS_FAIL_RATIO = 0.75
# Pinned host->device copies reach 70-85% of the link's rate; under half means a slow or shared link.
H2D_WARN_RATIO = 0.5
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
STEADY_RATIO = 0.85
BAD_GPU = (
    "the GPU computes wrong results: stop, do not train on it; on a rented instance move to another "
    "machine and tell the provider"
)


def _probe(r: dict[str, Any], probe: Probe) -> tuple[Any, Finding | None]:
    reading = gpu_reading(r, probe)
    if reading is None:
        return None, no_gpu()
    err = probe_error(reading)
    if err:
        return None, fail(
            f"the {probe.name} probe crashed: {err}",
            "run `samebox selftest --json` and read its timings; "
            "a CUDA error here usually means a broken driver or GPU",
        )
    return reading, None


def matmul_accuracy(r: dict[str, Any]) -> list[Finding]:
    reading, early = _probe(r, MATMUL_ACCURACY)
    if early:
        return [early]
    found = []
    for dtype, bound in MATMUL_REL_ERROR.items():
        res = reading.get(dtype) or {}
        err = res.get("max_rel_error")
        text = f"{dtype} matmul (n={reading['n']}) vs fp64: max relative error {err:.1e} (bound {bound:.0e})"
        if not res.get("finite") or err is None or err > bound:
            found.append(fail(text, BAD_GPU))
        else:
            found.append(ok(text))
    return found


def reference_tflops(gpu_name: str) -> tuple[str, float] | None:
    """(table key, reference TFLOP/s) for a GPU name as NVML reports it, or None when the table has none."""
    key = compat.normalise_gpu_name(gpu_name)
    if "PCIE" in gpu_name.upper() and f"{key}-PCIE" in compat.BF16_MATMUL_TFLOPS:
        key = f"{key}-PCIE"
    if key in compat.BF16_MATMUL_TFLOPS:
        return key, compat.BF16_MATMUL_TFLOPS[key]
    for known in sorted(compat.BF16_MATMUL_TFLOPS, key=len, reverse=True):
        if "-" not in known and key.startswith(known):
            return known, compat.BF16_MATMUL_TFLOPS[known]
    return None


def sustained_tflops(load: dict[str, Any]) -> float:
    """Median over the one-second windows, leaving out the first (clock ramp-up) when there are others."""
    windows = load.get("tflops_windows") or [0.0]
    return statistics.median(windows[1:] or windows)


def matmul_tflops(r: dict[str, Any]) -> Finding:
    load, early = _probe(r, LOAD)
    if early:
        return early
    devices = nvml_devices(r)
    name = devices[0]["name"] if devices else ((r.get(TORCH.name) or {}).get("devices") or [{}])[0].get("name", "?")
    measured = sustained_tflops(load)
    ref = reference_tflops(name)
    if ref is None:
        return Finding(
            "n/a",
            f"{name}: {measured:.0f} TFLOP/s bf16; no reference for this GPU to judge it",
            "add its sustained TFLOP/s to BF16_MATMUL_TFLOPS in builder/core/compat.py",
        )
    key, expected = ref
    text = (
        f"{name}: {measured:.0f} TFLOP/s bf16 sustained, {measured / expected:.2f}x the {key} reference {expected:.0f}"
    )
    if load.get("cuda_graph") is False:  # launched one by one: a host busy elsewhere can starve the GPU
        text += f" (matmuls launched one at a time: no CUDA graph here, {load.get('cuda_graph_error') or 'unknown'})"
    if measured < TFLOPS_FAIL_RATIO * expected:
        return fail(
            text,
            "the GPU is slow: see the clock_events, power_limit and temperature findings; "
            "on a rented instance move to another machine",
        )
    return ok(text)


def bandwidth(r: dict[str, Any]) -> list[Finding]:
    bw, early = _probe(r, BANDWIDTH)
    if early:
        return [early]
    found = [ok(f"device-to-device copy {bw['d2d_gbps']:.0f} GB/s")]
    devices = nvml_devices(r)
    h2d = bw["h2d_pinned_gbps"]
    gen, width = (devices[0].get("pcie_max_gen"), devices[0].get("pcie_max_width")) if devices else (None, None)
    if gen in PCIE_GBPS_PER_LANE and width:
        link = PCIE_GBPS_PER_LANE[gen] * width
        text = f"pinned host-to-device {h2d:.1f} GB/s ({h2d / link:.2f}x PCIe gen{gen} x{width}'s {link:.0f} GB/s)"
        if h2d < H2D_WARN_RATIO * link:
            found.append(
                warn(
                    text,
                    "data loading from host memory will be slow: check the pcie finding, NUMA "
                    "placement (run on the GPU's CPU socket) and other jobs on the host",
                )
            )
        else:
            found.append(ok(text))
    else:
        found.append(Finding("n/a", f"pinned host-to-device {h2d:.1f} GB/s; PCIe link unknown, not judged"))
    return found


def memory_pattern(r: dict[str, Any]) -> Finding:
    m, early = _probe(r, MEMORY_PATTERN)
    if early:
        return early
    tested = f"{gib(m['bytes_tested'])} of {gib(m['free_bytes'])} free"
    if m["mismatches"]:
        return fail(f"memory pattern test: {m['mismatches']} words read back wrong over {tested}", BAD_GPU)
    if m["bytes_tested"] < 0.5 * m["free_bytes"]:
        return warn(f"memory pattern test covered only {tested}", "free GPU memory (other processes) and rerun --full")
    return ok(f"memory pattern test: {tested} written and read back, no errors")


def repeatability(r: dict[str, Any]) -> Finding:
    rep, early = _probe(r, REPEATABILITY)
    if early:
        return early
    if rep["differing"]:
        return fail(
            f"one fixed-seed matmul gave different bits {rep['differing']} of {rep['repeats']} times: "
            "silent data corruption",
            BAD_GPU,
        )
    return ok(f"one fixed-seed matmul repeated {rep['repeats']} times: bit-identical")


def load_steadiness(r: dict[str, Any]) -> Finding:
    load, early = _probe(r, LOAD)
    if early:
        return early
    windows = (load.get("tflops_windows") or [])[1:]
    if len(windows) < 3:
        return Finding("n/a", "load too short to judge steadiness")
    median = statistics.median(windows)
    low = min(windows)
    text = f"{load['seconds']:.0f} s load: TFLOP/s per second min {low:.0f}, median {median:.0f}"
    if low < STEADY_RATIO * median:
        return warn(f"{text}: throughput dipped", "see the clock_events and temperature findings")
    return ok(text)
