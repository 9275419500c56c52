"""The checks, in report order, each one declaration: name, group, the probe whose reading it judges (declared in
probes.py; several checks may judge one), the judge (``(readings) -> Finding | list[Finding]``, in a checks_*
module) and the modes it runs in. To add a check, declare it here: the collector takes a probe's reading only in
the modes of the checks that name it, so a mode's gating is written once, in ``modes``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from builder.selftest import checks_env as env
from builder.selftest import checks_health as health
from builder.selftest import checks_identity as identity
from builder.selftest import checks_interconnect as interconnect
from builder.selftest import checks_kernels as kernels
from builder.selftest import checks_numerics as numerics
from builder.selftest import probes as p
from builder.selftest.findings import Finding

MODES = ("quick", "full")
BOTH, FULL = frozenset(MODES), frozenset({"full"})


@dataclass(frozen=True)
class Check:
    """One self-test check: its findings are reported as ``name`` in ``group``, in each of ``modes``."""

    name: str
    group: str
    probe: p.Probe | None  # None: it judges what the run was asked for (the model), not a measurement
    judge: Callable[[dict[str, Any]], Finding | list[Finding]]
    modes: frozenset[str] = BOTH


CHECKS: tuple[Check, ...] = (
    Check("nvidia_driver", "identity", p.TORCH, identity.nvidia_driver),
    Check("driver_cuda", "identity", p.NVML, identity.driver_cuda),
    Check("gpu_arch", "identity", p.TORCH, identity.gpu_arch),
    Check("mig", "identity", p.NVML, identity.mig),
    Check("memory_in_use", "identity", p.NVML, identity.memory_in_use),
    Check("ecc", "health", p.NVML_AFTER, health.ecc),
    Check("remapped_rows", "health", p.NVML_AFTER, health.remapped_rows),
    Check("retired_pages", "health", p.NVML, health.retired_pages),
    Check("recovery_action", "health", p.NVML_AFTER, health.recovery_action),
    Check("clock_events", "health", p.LOAD, health.clock_events),
    Check("pcie", "health", p.LOAD, health.pcie),
    Check("temperature", "health", p.LOAD, health.temperature),
    Check("power_limit", "health", p.NVML, health.power_limit),
    Check("matmul_accuracy", "numerics", p.MATMUL_ACCURACY, numerics.matmul_accuracy),
    Check("matmul_tflops", "numerics", p.LOAD, numerics.matmul_tflops),
    Check("bandwidth", "numerics", p.BANDWIDTH, numerics.bandwidth),
    Check("memory_pattern", "numerics", p.MEMORY_PATTERN, numerics.memory_pattern, FULL),
    Check("repeatability", "numerics", p.REPEATABILITY, numerics.repeatability, FULL),
    Check("load_steadiness", "numerics", p.LOAD, numerics.load_steadiness, FULL),
    Check("allreduce", "interconnect", p.ALLREDUCE, interconnect.allreduce),
    Check("model", "kernels", None, kernels.model_needs),
    Check("flash_attn", "kernels", p.FLASH_ATTN, kernels.flash_attn),
    Check("bitsandbytes", "kernels", p.BITSANDBYTES, kernels.bitsandbytes),
    Check("sdpa_backends", "kernels", p.SDPA_BACKENDS, kernels.sdpa_backends),
    Check("fused_layers", "kernels", p.FUSED_LAYERS, kernels.fused_layers),
    Check("lockfile", "environment", p.LOCKFILE, env.lockfile),
    Check("shm", "environment", p.SHM, env.shm),
    Check("data_dir", "environment", p.DATA_DIR, env.data_dir),
    Check("hf_cache", "environment", p.HF_CACHE, env.hf_cache),
    # full only: in quick, importing transformers and peft costs ~5 s, and the trainer's preflight is followed by
    # the trainer's own first steps anyway.
    Check("lora_smoke", "trainer", p.LORA_SMOKE, kernels.lora_smoke, FULL),
)


def checks_for(mode: str) -> tuple[Check, ...]:
    return tuple(c for c in CHECKS if mode in c.modes)


def probes_for(mode: str) -> tuple[p.Probe, ...]:
    """The probes ``mode``'s checks judge, in schedule order. The identity probes always run: every GPU check
    and the report's machine summary read them."""
    named = {c.probe.name for c in checks_for(mode) if c.probe} | {p.NVML.name, p.TORCH.name}
    return tuple(probe for probe in p.PROBES if probe.name in named)


def judge(readings: dict[str, Any], mode: str | None = None) -> list[Finding]:
    """Every check of ``mode`` (default: the mode the readings were taken in) over one readings dict."""
    mode = mode or readings.get("mode", "quick")
    findings: list[Finding] = []
    for check in checks_for(mode):
        result = check.judge(readings)
        for f in result if isinstance(result, list) else [result]:
            findings.append(replace(f, check=check.name, group=check.group))
    return findings
