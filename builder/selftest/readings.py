"""The ``Readings`` collector: runs every live query and probe once and returns one JSON-ready dict.

Checks never query the machine; they judge this dict. The same dict is what bench/selftest_gpu.py --capture
records as test fixtures, so every decision runs in CI on readings taken from a real GPU machine.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from builder.selftest import allreduce, env_probes, gpu_probes, kernel_probes, nvml_reader
from builder.selftest.model import AttentionNeeds

READINGS_VERSION = 1

# mode -> seconds of sustained matmul load with NVML sampled throughout. On the H100 the first one-second window
# ran as fast as the later ones (bench/results/selftest_gpu.json), so quick's 2 s give one judged window after
# the dropped first and ~8 NVML samples.
LOAD_SECONDS = {"quick": 2.0, "full": 25.0}
# mode -> timed all-reduces across the GPUs; a run still going after ALLREDUCE_TIMEOUT_S is a hang.
ALLREDUCE_ITERS = {"quick": 10, "full": 30}
ALLREDUCE_TIMEOUT_S = 90.0
# The kernel probes a job may need, and the module each imports; `samebox selftest --kernels` picks (the trainer's
# preflight passes what its config uses).
KERNELS = ("flash-attn", "bitsandbytes", "sdpa", "fused")
KERNEL_MODULES = {"flash-attn": "flash_attn", "bitsandbytes": "bitsandbytes"}
NOT_NEEDED = {"not_needed": True}
SMOKE_MODULES = ["transformers", "peft"]  # full's LoRA smoke run


def _probe(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """Runs one probe; an exception becomes ``{"probe_error": ...}`` (the checks judge it), never a traceback."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        return {
            "probe_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "where": traceback.format_exc(limit=-2).splitlines()[-3:],
        }
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _import_quietly(module: str) -> None:
    with contextlib.suppress(Exception):  # the probe imports it again and records why it fails
        importlib.import_module(module)


def _importing(timings: dict[str, float], modules: list[str]) -> dict[str, Callable[[], Any]]:
    """One thread per library the job's kernel probes need, started now; each value waits for its import."""
    return {m: _in_background(timings, f"import_{m}", lambda m=m: _import_quietly(m)) for m in modules}


def _in_background(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Starts ``fn`` on a thread now; the returned function waits for it and gives its result. The collector uses
    it for work that mostly waits (imports while the GPU computes, disk writes, reading package metadata)."""
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=_probe(timings, name, fn)), daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        return box.get("result")

    return result


def collect(
    mode: str,
    needs: AttentionNeeds,
    data_dir: str | None = None,
    lockfile: str | None = None,
    flash_attn_extension: str | None = None,
    kernels: tuple[str, ...] = KERNELS,
) -> dict[str, Any]:
    """Everything the checks judge, for ``mode`` 'quick' or 'full'; ``kernels``: which of KERNELS the job uses
    (the others are not imported and their checks say n/a).

    Independent work overlaps: once torch is in, the kernel libraries import on threads (seconds of Python, while
    the GPU computes: the load queues a second of matmuls per sync, so a thread holding the GIL cannot starve it);
    the quick environment probes run on another thread beside the accuracy probe; the processes of a multi-GPU
    all-reduce start before the load and wait for it to end. Nothing else touches the GPU while its speed is
    measured.
    """
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {KERNELS}")
    timings: dict[str, float] = {}
    r: dict[str, Any] = {
        "readings_version": READINGS_VERSION,
        "mode": mode,
        "model": needs.to_dict(),
        "kernels": list(kernels),
        "timings": timings,
        "process": {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
    }
    r["nvml"] = _probe(timings, "nvml", nvml_reader.read_nvml)
    r["torch"] = _probe(timings, "torch", gpu_probes.torch_info)
    torch_version = r["torch"].get("version") if isinstance(r["torch"], dict) else None

    def env_readings() -> dict[str, Any]:
        return _env_readings(timings, mode, data_dir, lockfile, torch_version)

    # Quick: the environment probes (a disk write, package metadata) beside the accuracy probe. Full hashes every
    # installed file (seconds of CPU): beside the memory pattern and the kernels, after the GPU's speed is measured.
    env = _in_background(timings, "env", env_readings) if mode == "quick" else None
    if not (isinstance(r["torch"], dict) and r["torch"].get("cuda_available")):
        r["env"] = env() if env else env_readings()
        r["gpu"] = None  # no CUDA device: the GPU checks report why from the nvml/torch readings
        return r
    # Each kernel library imports torch first: its thread starts once torch is in (no GPU: none starts at all).
    modules = [KERNEL_MODULES[k] for k in kernels if k in KERNEL_MODULES] + (SMOKE_MODULES if mode == "full" else [])
    imported = _importing(timings, modules)
    if allreduce.under_torchrun():
        _probe(timings, "set_device", gpu_probes.use_local_rank)  # each rank tests its own GPU
    run_allreduce = allreduce.prepare(r["torch"]["device_count"], ALLREDUCE_TIMEOUT_S, ALLREDUCE_ITERS[mode])
    gpu: dict[str, Any] = {}
    gpu["accuracy"] = _probe(timings, "accuracy", gpu_probes.matmul_accuracy)
    if env:
        r["env"] = env()
    gpu["load"] = _probe(timings, "load", lambda: gpu_probes.sustained_load(LOAD_SECONDS[mode]))
    gpu["bandwidth"] = _probe(timings, "bandwidth", gpu_probes.bandwidth)
    gpu["allreduce"] = _probe(timings, "allreduce", run_allreduce)
    env = env or _in_background(timings, "env", env_readings)
    if mode == "full":
        gpu["memory_pattern"] = _probe(timings, "memory_pattern", gpu_probes.memory_pattern)
        gpu["repeatability"] = _probe(timings, "repeatability", gpu_probes.repeatability)
    gpu.update(_kernel_readings(timings, mode, needs, kernels, imported, flash_attn_extension))
    # NVML again after the load: ECC counters and remapped rows may have moved while the GPU worked.
    r["nvml_after"] = _probe(timings, "nvml_after", nvml_reader.read_nvml)
    r["gpu"] = gpu
    r["env"] = env()
    return r


def _kernel_readings(
    timings: dict[str, float],
    mode: str,
    needs: AttentionNeeds,
    kernels: tuple[str, ...],
    imported: dict[str, Callable[[], Any]],
    flash_attn_extension: str | None,
) -> dict[str, Any]:
    """The job's kernels, each probed once its library has imported (flash-attn's is quick, so it goes first and
    bitsandbytes, slow to import, last); a kernel the job does not use reads NOT_NEEDED."""
    out = {name: dict(NOT_NEEDED) for name in ("flash_attn", "bitsandbytes", "sdpa", "fused")}
    # Quick calls flash-attn with the features the model needs; full also finds which ones the build lacks.
    features = kernel_probes.FLASH_ATTN_FEATURES if mode == "full" else needs.features
    if "flash-attn" in kernels:
        imported["flash_attn"]()
        out["flash_attn"] = _probe(timings, "flash_attn", lambda: kernel_probes.flash_attn(
            list(needs.head_dims), needs.dtype, needs.window, flash_attn_extension, tuple(features)))
    if "sdpa" in kernels:
        out["sdpa"] = _probe(timings, "sdpa", kernel_probes.sdpa_backends)
    if "fused" in kernels:  # the trainer's fused layers: Liger's kernels and the varlen attention they would use
        out["fused"] = _probe(timings, "fused", lambda: kernel_probes.fused_layers(max(needs.head_dims)))
    if "bitsandbytes" in kernels:
        imported["bitsandbytes"]()
        out["bitsandbytes"] = _probe(timings, "bitsandbytes", kernel_probes.bitsandbytes)
    if mode == "full":
        for module in SMOKE_MODULES:
            imported[module]()
        out["lora_smoke"] = _probe(timings, "lora_smoke", kernel_probes.lora_smoke)
    return out


def _env_readings(timings: dict[str, float], mode: str, data_dir: str | None, lockfile: str | None,
                  torch_version: str | None) -> dict[str, Any]:
    """The environment probes, one after another (on the collector's background thread)."""
    return {
        "lock": _probe(timings, "lock", lambda: env_probes.lockfile_reading(lockfile, torch_version, mode == "full")),
        "shm": _probe(timings, "shm", env_probes.shm),
        "data_dir": _probe(timings, "data_dir", lambda: env_probes.data_dir(data_dir)),
        "hf_cache": _probe(timings, "hf_cache", env_probes.hf_cache),
    }
