"""The checks, in report order. To add a check, write a function ``(readings) -> Finding | list[Finding]``
in one of the checks_* modules and add it here."""

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
from builder.selftest.findings import Finding

MODES = ("quick", "full")


@dataclass(frozen=True)
class Check:
    name: str
    group: str
    judge: Callable[[dict[str, Any]], Finding | list[Finding]]
    full_only: bool = False


CHECKS: tuple[Check, ...] = (
    Check("nvidia_driver", "identity", identity.nvidia_driver),
    Check("driver_cuda", "identity", identity.driver_cuda),
    Check("gpu_arch", "identity", identity.gpu_arch),
    Check("mig", "identity", identity.mig),
    Check("memory_in_use", "identity", identity.memory_in_use),
    Check("ecc", "health", health.ecc),
    Check("remapped_rows", "health", health.remapped_rows),
    Check("retired_pages", "health", health.retired_pages),
    Check("recovery_action", "health", health.recovery_action),
    Check("clock_events", "health", health.clock_events),
    Check("pcie", "health", health.pcie),
    Check("temperature", "health", health.temperature),
    Check("power_limit", "health", health.power_limit),
    Check("matmul_accuracy", "numerics", numerics.matmul_accuracy),
    Check("matmul_tflops", "numerics", numerics.matmul_tflops),
    Check("bandwidth", "numerics", numerics.bandwidth),
    Check("memory_pattern", "numerics", numerics.memory_pattern, full_only=True),
    Check("repeatability", "numerics", numerics.repeatability, full_only=True),
    Check("load_steadiness", "numerics", numerics.load_steadiness, full_only=True),
    Check("allreduce", "interconnect", interconnect.allreduce),
    Check("model", "kernels", kernels.model_needs),
    Check("flash_attn", "kernels", kernels.flash_attn),
    Check("bitsandbytes", "kernels", kernels.bitsandbytes),
    Check("sdpa_backends", "kernels", kernels.sdpa_backends),
    Check("fused_layers", "kernels", kernels.fused_layers),
    Check("lockfile", "environment", env.lockfile),
    Check("shm", "environment", env.shm),
    Check("data_dir", "environment", env.data_dir),
    Check("hf_cache", "environment", env.hf_cache),
    # full only: in quick, importing transformers and peft costs ~5 s, and the trainer's preflight is followed by
    # the trainer's own first steps anyway.
    Check("lora_smoke", "trainer", kernels.lora_smoke, full_only=True),
)


def judge(readings: dict[str, Any], mode: str | None = None) -> list[Finding]:
    """Every check of ``mode`` (default: the mode the readings were taken in) over one readings dict. Pure."""
    mode = mode or readings.get("mode", "quick")
    findings: list[Finding] = []
    for check in CHECKS:
        if check.full_only and mode != "full":
            continue
        result = check.judge(readings)
        for f in result if isinstance(result, list) else [result]:
            findings.append(replace(f, check=check.name, group=check.group))
    return findings
