"""NVML (nvidia-ml-py), the one reader of the NVIDIA driver: the GPU inventory every command's Environment holds."""

from __future__ import annotations

from typing import Any


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inventory() -> dict[str, Any] | None:
    """{"driver": "580.159.04", "gpus": [{"name", "compute_capability": "9.0", "memory_mib"}, ...]}, with
    "error" when NVML failed part way; None where nvidia-ml-py or a usable driver is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    facts: dict[str, Any] = {"driver": None, "gpus": []}
    try:
        facts["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            facts["gpus"].append({
                "compute_capability": f"{major}.{minor}",
                "memory_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1 << 20),
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
            })
    except Exception as e:
        facts["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass  # the readings are taken; a failing shutdown changes none of them
    return facts
