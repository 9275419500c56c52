"""NVML (nvidia-ml-py), the one module that talks to the NVIDIA driver: the GPU inventory every Environment holds
(``inventory``) and the self-test's health readings (``read_nvml``, ``sample``) as plain, JSON-ready dicts.

Every field is a value, or None when the card or driver does not support the query (GeForce ECC, retired pages
on Ampere and newer); other query errors are kept under ``errors`` so a check can say what went wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _nvml() -> Any:
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Reader:
    """Calls NVML getters, turning NotSupported into None and other errors into ``errors`` entries."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: dict[str, str] = {}

    def get(self, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.nvml.NVMLError as e:
            not_supported = getattr(self.nvml, "NVML_ERROR_NOT_SUPPORTED", 3)
            if getattr(e, "value", None) != not_supported:
                self.errors[key] = _text(e)
            return None
        except (AttributeError, TypeError) as e:  # a getter missing from an older nvidia-ml-py
            self.errors[key] = f"{type(e).__name__}: {e}"
            return None


def _ecc(r: _Reader, h: Any) -> dict[str, Any]:
    n = r.nvml
    out: dict[str, Any] = {"mode": r.get("ecc.mode", lambda: list(n.nvmlDeviceGetEccMode(h)))}
    for name, counter in (("volatile", n.NVML_VOLATILE_ECC), ("aggregate", n.NVML_AGGREGATE_ECC)):
        for kind, etype in (
            ("uncorrected", n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ("corrected", n.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ):
            out[f"{kind}_{name}"] = r.get(
                f"ecc.{kind}_{name}", lambda c=counter, t=etype: int(n.nvmlDeviceGetTotalEccErrors(h, t, c))
            )
    return out


def _remapped_rows(r: _Reader, h: Any) -> dict[str, Any] | None:
    rows = r.get("remapped_rows", lambda: r.nvml.nvmlDeviceGetRemappedRows(h))
    if rows is None:
        return None
    correctable, uncorrectable, pending, failure = rows
    return {
        "correctable": int(correctable),
        "uncorrectable": int(uncorrectable),
        "pending": bool(pending),
        "failure": bool(failure),
    }


def _retired_pages(r: _Reader, h: Any) -> dict[str, Any] | None:
    n = r.nvml
    double = r.get(
        "retired_pages.double_bit",
        lambda: len(n.nvmlDeviceGetRetiredPages(h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)),
    )
    if double is None:
        return None
    single = r.get(
        "retired_pages.single_bit",
        lambda: len(n.nvmlDeviceGetRetiredPages(h, n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)),
    )
    pending = r.get("retired_pages.pending", lambda: bool(n.nvmlDeviceGetRetiredPagesPendingStatus(h)))
    return {"double_bit": double, "single_bit": single, "pending": pending}


def _recovery_action(r: _Reader, h: Any) -> int | None:
    n = r.nvml
    field_id = getattr(n, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
    if field_id is None:
        return None
    values = r.get("recovery_action", lambda: n.nvmlDeviceGetFieldValues(h, [field_id]))
    if not values or values[0].nvmlReturn != n.NVML_SUCCESS:
        return None
    v = values[0]
    return int(getattr(v.value, "uiVal", v.value.ullVal))


def _processes(r: _Reader, h: Any) -> list[dict[str, Any]] | None:
    procs = r.get("processes", lambda: r.nvml.nvmlDeviceGetComputeRunningProcesses(h))
    if procs is None:
        return None
    return [{"pid": int(p.pid), "used_memory": int(p.usedGpuMemory or 0)} for p in procs]


def _nvlink_active(nvml: Any, h: Any) -> int | None:
    """Active NVLink links, or None when the card has no NVLink (the first query is not supported)."""
    active = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            active += int(nvml.nvmlDeviceGetNvLinkState(h, link) == getattr(nvml, "NVML_FEATURE_ENABLED", 1))
        except nvml.NVMLError:
            if link == 0:
                return None
            break  # past this card's last link
    return active


def sample(nvml: Any, h: Any) -> dict[str, Any]:
    """The fast-changing values, read repeatedly during load: clocks-event reasons, PCIe link, temperature,
    power, SM clock."""
    r = _Reader(nvml)
    n = nvml
    return {
        "t": time.monotonic(),
        "clocks_event_reasons": r.get("clocks_event_reasons", lambda: int(n.nvmlDeviceGetCurrentClocksEventReasons(h))),
        "pcie_gen": r.get("pcie_gen", lambda: int(n.nvmlDeviceGetCurrPcieLinkGeneration(h))),
        "pcie_width": r.get("pcie_width", lambda: int(n.nvmlDeviceGetCurrPcieLinkWidth(h))),
        "temperature_c": r.get("temperature", lambda: int(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))),
        "power_mw": r.get("power", lambda: int(n.nvmlDeviceGetPowerUsage(h))),
        "sm_clock_mhz": r.get("sm_clock", lambda: int(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))),
        "utilization_gpu": r.get("utilization", lambda: int(n.nvmlDeviceGetUtilizationRates(h).gpu)),
    }


def _device(nvml: Any, index: int) -> dict[str, Any]:
    n = nvml
    h = n.nvmlDeviceGetHandleByIndex(index)
    r = _Reader(n)
    mem = r.get("memory", lambda: n.nvmlDeviceGetMemoryInfo(h))
    thresholds = {
        name: r.get(f"temperature_threshold.{name}", lambda c=const: int(n.nvmlDeviceGetTemperatureThreshold(h, c)))
        for name, const in (
            ("slowdown", n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            ("shutdown", n.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
            ("gpu_max", n.NVML_TEMPERATURE_THRESHOLD_GPU_MAX),
        )
    }
    return {
        "index": index,
        "name": _text(n.nvmlDeviceGetName(h)),
        "uuid": r.get("uuid", lambda: _text(n.nvmlDeviceGetUUID(h))),
        "pci_bus_id": r.get("pci", lambda: _text(n.nvmlDeviceGetPciInfo(h).busId)),
        "compute_capability": r.get("compute_capability", lambda: list(n.nvmlDeviceGetCudaComputeCapability(h))),
        "mig_mode": r.get("mig_mode", lambda: list(n.nvmlDeviceGetMigMode(h))),
        "memory": None if mem is None else {"total": int(mem.total), "used": int(mem.used), "free": int(mem.free)},
        "processes": _processes(r, h),
        "ecc": _ecc(r, h),
        "remapped_rows": _remapped_rows(r, h),
        "retired_pages": _retired_pages(r, h),
        "recovery_action": _recovery_action(r, h),
        "supported_clocks_event_reasons": r.get(
            "supported_clocks_event_reasons", lambda: int(n.nvmlDeviceGetSupportedClocksEventReasons(h))
        ),
        "pcie_max_gen": r.get("pcie_max_gen", lambda: int(n.nvmlDeviceGetMaxPcieLinkGeneration(h))),
        "pcie_gpu_max_gen": r.get("pcie_gpu_max_gen", lambda: int(n.nvmlDeviceGetGpuMaxPcieLinkGeneration(h))),
        "pcie_max_width": r.get("pcie_max_width", lambda: int(n.nvmlDeviceGetMaxPcieLinkWidth(h))),
        "nvlink_active": _nvlink_active(n, h),
        "temperature_thresholds": thresholds,
        "power_limit_enforced_mw": r.get("power_enforced", lambda: int(n.nvmlDeviceGetEnforcedPowerLimit(h))),
        "power_limit_default_mw": r.get("power_default", lambda: int(n.nvmlDeviceGetPowerManagementDefaultLimit(h))),
        "persistence_mode": r.get("persistence_mode", lambda: int(n.nvmlDeviceGetPersistenceMode(h))),
        "idle": sample(n, h),
        "errors": r.errors,
    }


def read_nvml() -> dict[str, Any]:
    """Driver, CUDA driver version and every device's static and health readings. Never raises: a machine
    without the NVIDIA driver gets ``{"available": False, "error": ...}``."""
    try:
        n = _nvml()
    except ImportError as e:
        return {"available": False, "error": f"nvidia-ml-py is not installed ({e})", "kind": "no_pynvml"}
    try:
        n.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ... all mean: no usable driver
        return {"available": False, "error": _text(e), "kind": "no_driver"}
    try:
        cuda = n.nvmlSystemGetCudaDriverVersion_v2()
        count = n.nvmlDeviceGetCount()
        return {
            "available": True,
            "driver_version": _text(n.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": f"{cuda // 1000}.{(cuda % 1000) // 10}",
            "nvml_version": _text(n.nvmlSystemGetNVMLVersion()),
            "device_count": int(count),
            "devices": [_device(n, i) for i in range(count)],
        }
    finally:
        n.nvmlShutdown()


def inventory() -> dict[str, Any] | None:
    """{"driver": "580.159.04", "gpus": [{"name", "compute_capability": "9.0", "memory_mib"}, ...]}, with
    "error" when NVML failed part way; None where nvidia-ml-py or a usable driver is missing."""
    try:
        pynvml = _nvml()
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
