"""The ``Readings`` collector: runs every live query and probe once and returns one JSON-ready dict.

Checks never query the machine; they judge this dict. The same dict is what bench/selftest_gpu.py --capture
records as test fixtures, so every decision runs in CI on readings taken from a real GPU machine.
"""

from __future__ import annotations

import os
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


def collect(
    mode: str,
    needs: AttentionNeeds,
    data_dir: str | None = None,
    lockfile: str | None = None,
    flash_attn_extension: str | None = None,
) -> dict[str, Any]:
    """Everything the checks judge, for ``mode`` 'quick' or 'full'."""
    timings: dict[str, float] = {}
    r: dict[str, Any] = {
        "readings_version": READINGS_VERSION,
        "mode": mode,
        "model": needs.to_dict(),
        "timings": timings,
        "process": {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
    }
    r["nvml"] = _probe(timings, "nvml", nvml_reader.read_nvml)
    r["torch"] = _probe(timings, "torch", gpu_probes.torch_info)
    torch_version = r["torch"].get("version") if isinstance(r["torch"], dict) else None
    r["env"] = {
        "lock": _probe(timings, "lock", lambda: env_probes.lockfile_reading(lockfile, torch_version, mode == "full")),
        "shm": _probe(timings, "shm", env_probes.shm),
        "data_dir": _probe(timings, "data_dir", lambda: env_probes.data_dir(data_dir)),
        "hf_cache": _probe(timings, "hf_cache", env_probes.hf_cache),
    }
    if not (isinstance(r["torch"], dict) and r["torch"].get("cuda_available")):
        r["gpu"] = None  # no CUDA device: the GPU checks report why from the nvml/torch readings
        return r
    if allreduce.under_torchrun():
        _probe(timings, "set_device", gpu_probes.use_local_rank)  # each rank tests its own GPU
    gpu: dict[str, Any] = {}
    gpu["accuracy"] = _probe(timings, "accuracy", gpu_probes.matmul_accuracy)
    gpu["load"] = _probe(timings, "load", lambda: gpu_probes.sustained_load(LOAD_SECONDS[mode]))
    gpu["bandwidth"] = _probe(timings, "bandwidth", gpu_probes.bandwidth)
    gpu["allreduce"] = _probe(
        timings,
        "allreduce",
        lambda: allreduce.allreduce(r["torch"]["device_count"], ALLREDUCE_TIMEOUT_S, ALLREDUCE_ITERS[mode]),
    )
    if mode == "full":
        gpu["memory_pattern"] = _probe(timings, "memory_pattern", gpu_probes.memory_pattern)
        gpu["repeatability"] = _probe(timings, "repeatability", gpu_probes.repeatability)
    gpu["flash_attn"] = _probe(
        timings,
        "flash_attn",
        lambda: kernel_probes.flash_attn(list(needs.head_dims), needs.dtype, needs.window, flash_attn_extension),
    )
    gpu["bitsandbytes"] = _probe(timings, "bitsandbytes", kernel_probes.bitsandbytes)
    gpu["sdpa"] = _probe(timings, "sdpa", kernel_probes.sdpa_backends)
    if mode == "full":
        gpu["lora_smoke"] = _probe(timings, "lora_smoke", kernel_probes.lora_smoke)
    # NVML again after the load: ECC counters and remapped rows may have moved while the GPU worked.
    r["nvml_after"] = _probe(timings, "nvml_after", nvml_reader.read_nvml)
    r["gpu"] = gpu
    return r
