"""What a check says: a Finding (severity, message, remediation), and the helpers every check uses to read
the readings (one per probe, under the probe's name) without repeating the 'is there a GPU at all' logic."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from builder.selftest.probes import NVML, TORCH, Probe

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
SEVERITIES = (OK, WARN, FAIL, NA)

NO_GPU_REMEDIATION = "see the nvidia_driver finding: this check needs a working CUDA GPU"


@dataclass(frozen=True)
class Finding:
    """One verdict of one check. ``check`` and ``group`` are filled in by the runner from the registry."""

    severity: str
    message: str
    remediation: str = ""
    check: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def ok(message: str) -> Finding:
    return Finding(OK, message)


def warn(message: str, remediation: str) -> Finding:
    return Finding(WARN, message, remediation)


def fail(message: str, remediation: str) -> Finding:
    return Finding(FAIL, message, remediation)


def na(message: str, remediation: str = "") -> Finding:
    return Finding(NA, message, remediation)


def probe_error(reading: Any) -> str | None:
    """The exception a probe raised instead of returning readings (the collector's ``probe_error``), if any."""
    if isinstance(reading, dict) and "probe_error" in reading:
        return str(reading["probe_error"])
    return None


def nvml_devices(r: dict[str, Any], probe: Probe = NVML) -> list[dict[str, Any]]:
    nvml = r.get(probe.name)
    if not isinstance(nvml, dict) or not nvml.get("available"):
        return []
    return list(nvml.get("devices") or [])


def gpu_usable(r: dict[str, Any]) -> bool:
    """Whether torch saw a CUDA GPU: the collector runs the GPU probes only then."""
    torch = r.get(TORCH.name)
    return isinstance(torch, dict) and bool(torch.get("cuda_available"))


def gpu_reading(r: dict[str, Any], probe: Probe) -> Any:
    """One GPU probe's reading, or None when no CUDA GPU was usable (the GPU probes did not run)."""
    return r.get(probe.name) if gpu_usable(r) else None


def no_gpu() -> Finding:
    return na("skipped: no usable CUDA GPU", NO_GPU_REMEDIATION)


def gib(n: float) -> str:
    """A byte count for people: GiB, or MiB under one GiB (a 1 MiB tmpfs must not read '0.0 GiB')."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
