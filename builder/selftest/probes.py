"""The probes, declared once: each live measurement's name (its key in the readings), the function that takes it,
the stage of the collector's schedule it runs in, and what it needs first (a kernel the job uses, libraries to
import). A check names the probe it judges (registry.py); the collector runs the probes its mode's checks name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from builder.core import nvml
from builder.core.attention_needs import AttentionNeeds
from builder.selftest import allreduce, env_probes, gpu_probes, kernel_probes

# mode -> seconds of sustained matmul load with NVML sampled throughout. On the H100 the first one-second window
# ran as fast as the later ones (bench/results/selftest_gpu.json), so quick's 2 s give one judged window after
# the dropped first and ~8 NVML samples.
LOAD_SECONDS = {"quick": 2.0, "full": 25.0}
# mode -> timed all-reduces across the GPUs; a run still going after ALLREDUCE_TIMEOUT_S is a hang.
ALLREDUCE_ITERS = {"quick": 10, "full": 30}
ALLREDUCE_TIMEOUT_S = 90.0
# The kernel probes a job may need; `samebox selftest --kernels` picks (the trainer's preflight passes what its
# config uses). A probe of a kernel the job does not use reads NOT_NEEDED.
KERNELS = ("flash-attn", "bitsandbytes", "sdpa", "fused")
NOT_NEEDED = {"not_needed": True}

# The collector's schedule, in order (readings.collect): IDENTITY first, one after another (is there a GPU?);
# ACCURACY (quick runs the ENVIRONMENT probes on a thread beside it); TIMED, the GPU's speed, with nothing else
# running; MEMORY (full runs the ENVIRONMENT probes beside it and the kernels: they hash every installed file);
# KERNELS, each once its libraries have imported on their threads; AFTER, NVML again once the GPU has worked.
IDENTITY, ACCURACY, TIMED, MEMORY, KERNEL, AFTER, ENVIRONMENT = (
    "identity", "accuracy", "timed", "memory", "kernels", "after", "environment")
GPU_STAGES = (ACCURACY, TIMED, MEMORY, KERNEL, AFTER)


@dataclass(frozen=True)
class ProbeContext:
    """What the probes of one run are asked for: the mode, the model's attention, the user's paths, the kernels
    the job uses, and what the identity probes found (torch's version, the GPU count)."""

    mode: str
    needs: AttentionNeeds
    data_dir: str | None = None
    lockfile: str | None = None
    flash_attn_extension: str | None = None
    kernels: tuple[str, ...] = KERNELS
    torch_version: str | None = None
    device_count: int = 0


@dataclass(frozen=True)
class Probe:
    """One live measurement. ``read(context)`` returns a JSON-ready reading, stored under ``name``; an ``early``
    probe's ``read`` is called before the TIMED stage, sets its work going, and returns the function that gives
    the reading at the probe's turn. ``kernel``: the --kernels entry that selects it; ``imports``: modules it
    needs, imported on threads while the GPU computes."""

    name: str
    stage: str
    read: Callable[[ProbeContext], Any]
    early: bool = False
    kernel: str | None = None
    imports: tuple[str, ...] = ()


def _flash_attn(c: ProbeContext) -> Any:
    # Quick calls flash-attn with the features the model needs; full also finds which ones the build lacks.
    features = kernel_probes.FLASH_ATTN_FEATURES if c.mode == "full" else c.needs.features
    return kernel_probes.flash_attn(list(c.needs.head_dims), c.needs.dtype, c.needs.window, c.flash_attn_extension,
                                    tuple(features))


NVML = Probe("nvml", IDENTITY, lambda c: nvml.read_nvml())
TORCH = Probe("torch", IDENTITY, lambda c: gpu_probes.torch_info())
MATMUL_ACCURACY = Probe("matmul_accuracy", ACCURACY, lambda c: gpu_probes.matmul_accuracy())
LOAD = Probe("load", TIMED, lambda c: gpu_probes.sustained_load(LOAD_SECONDS[c.mode]))
BANDWIDTH = Probe("bandwidth", TIMED, lambda c: gpu_probes.bandwidth())
# The all-reduce's processes start (Python, torch) before the load and measure after it.
ALLREDUCE = Probe("allreduce", TIMED, lambda c: allreduce.prepare(c.device_count, ALLREDUCE_TIMEOUT_S,
                                                                  ALLREDUCE_ITERS[c.mode]), early=True)
MEMORY_PATTERN = Probe("memory_pattern", MEMORY, lambda c: gpu_probes.memory_pattern())
REPEATABILITY = Probe("repeatability", MEMORY, lambda c: gpu_probes.repeatability())
# flash-attn imports quickly, so it goes first; bitsandbytes, slow to import, last.
FLASH_ATTN = Probe("flash_attn", KERNEL, _flash_attn, kernel="flash-attn", imports=("flash_attn",))
SDPA_BACKENDS = Probe("sdpa_backends", KERNEL, lambda c: kernel_probes.sdpa_backends(), kernel="sdpa")
# Quick leaves Liger to the trainer's own check at start (its import alone took 10-15 s on an H200). What the probe
# imports is on the import thread, so no two threads import at once (torch._dynamo half-initialised).
FUSED_LAYERS = Probe("fused_layers", KERNEL,
                     lambda c: kernel_probes.fused_layers(max(c.needs.head_dims), every_backend=c.mode == "full",
                                                          liger=c.mode == "full"),
                     kernel="fused", imports=("flash_attn", "torch.nn.attention.varlen", "trainer.fused"))
BITSANDBYTES = Probe("bitsandbytes", KERNEL, lambda c: kernel_probes.bitsandbytes(), kernel="bitsandbytes",
                     imports=("bitsandbytes",))
LORA_SMOKE = Probe("lora_smoke", KERNEL, lambda c: kernel_probes.lora_smoke(), imports=("transformers", "peft"))
NVML_AFTER = Probe("nvml_after", AFTER, lambda c: nvml.read_nvml())
LOCKFILE = Probe("lockfile", ENVIRONMENT,
                 lambda c: env_probes.lockfile_reading(c.lockfile, c.torch_version, check_files=c.mode == "full"))
SHM = Probe("shm", ENVIRONMENT, lambda c: env_probes.shm())
DATA_DIR = Probe("data_dir", ENVIRONMENT, lambda c: env_probes.data_dir(c.data_dir))
HF_CACHE = Probe("hf_cache", ENVIRONMENT, lambda c: env_probes.hf_cache())

# Every probe, in the order each stage runs them.
PROBES: tuple[Probe, ...] = (
    NVML, TORCH, MATMUL_ACCURACY, LOAD, BANDWIDTH, ALLREDUCE, MEMORY_PATTERN, REPEATABILITY,
    FLASH_ATTN, SDPA_BACKENDS, FUSED_LAYERS, BITSANDBYTES, LORA_SMOKE, NVML_AFTER, LOCKFILE, SHM, DATA_DIR, HF_CACHE,
)
