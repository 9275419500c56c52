"""GPU faults (ECC, row remapping, clocks, power, other processes, matmul accuracy and speed, PCIe, driver),
each injected by editing a copy of a healthy machine's recorded readings, are caught by the right check with the
right remediation. Environment and kernel faults: test_faults.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.selftest.conftest import assert_fault_caught, severities

GiB = 2**30


def dev(r: dict[str, Any]) -> dict[str, Any]:
    return r["nvml"]["devices"][0]


def after(r: dict[str, Any]) -> dict[str, Any]:
    import copy

    r["nvml_after"] = copy.deepcopy(r["nvml"])
    return r["nvml_after"]["devices"][0]


def samples(r: dict[str, Any]) -> list[dict[str, Any]]:
    return r["load"]["samples"]


def slowdown(r: dict[str, Any]) -> int:
    return dev(r)["temperature_thresholds"]["slowdown"]


def reference(r: dict[str, Any]) -> float:
    from builder.selftest.checks_numerics import reference_tflops

    return reference_tflops(dev(r)["name"])[1]


def set_reason(r: dict[str, Any], bit: int) -> None:
    samples(r)[5]["clocks_event_reasons"] |= bit


# (fault id, edit, check, severity, text expected in the message, text expected in the remediation)
GPU_FAULTS = [
    (
        "ecc volatile",
        lambda r: dev(r)["ecc"].update(uncorrected_volatile=2),
        "ecc",
        "fail",
        "2 uncorrectable ECC error(s) since the last reset",
        "move to another machine",
    ),
    (
        "ecc during test",
        lambda r: after(r)["ecc"].update(uncorrected_volatile=1),
        "ecc",
        "fail",
        "during the test",
        "move to another machine",
    ),
    ("ecc aggregate only", lambda r: dev(r)["ecc"].update(uncorrected_aggregate=3), "ecc", "warn", "lifetime", ""),
    ("ecc off", lambda r: dev(r)["ecc"].update(mode=[0, 0]), "ecc", "warn", "ECC is off", "nvidia-smi -i N -e 1"),
    (
        "geforce no ecc",
        lambda r: dev(r)["ecc"].update(mode=None, uncorrected_volatile=None),
        "ecc",
        "n/a",
        "does not report ECC",
        "",
    ),
    (
        "remap pending",
        lambda r: dev(r)["remapped_rows"].update(pending=True),
        "remapped_rows",
        "fail",
        "pending",
        "nvidia-smi -r",
    ),
    (
        "remap failed",
        lambda r: dev(r)["remapped_rows"].update(failure=True),
        "remapped_rows",
        "fail",
        "failed",
        "tell the provider",
    ),
    (
        "no row remapper",
        lambda r: [d.update(remapped_rows=None) for d in (dev(r), r["nvml_after"]["devices"][0])],
        "remapped_rows",
        "n/a",
        "no row remapping",
        "",
    ),
    (
        "retired pages limit",
        lambda r: dev(r).update(retired_pages={"double_bit": 40, "single_bit": 20, "pending": False}),
        "retired_pages",
        "fail",
        "60 retired pages",
        "move to another machine",
    ),
    (
        "retirement pending",
        lambda r: dev(r).update(retired_pages={"double_bit": 1, "single_bit": 0, "pending": True}),
        "retired_pages",
        "fail",
        "pending",
        "reset the GPU",
    ),
    (
        "recovery reset",
        lambda r: dev(r).update(recovery_action=1),
        "recovery_action",
        "fail",
        "GPU reset",
        "nvidia-smi -r",
    ),
    (
        "recovery reboot",
        lambda r: dev(r).update(recovery_action=2),
        "recovery_action",
        "fail",
        "node reboot",
        "migrate",
    ),
    ("hw slowdown", lambda r: set_reason(r, 0x8), "clock_events", "fail", "hardware slowdown", "cooling"),
    ("hw thermal", lambda r: set_reason(r, 0x40), "clock_events", "fail", "thermal", "cooling"),
    ("power brake", lambda r: set_reason(r, 0x80), "clock_events", "fail", "power-brake", "power delivery"),
    ("sw thermal", lambda r: set_reason(r, 0x20), "clock_events", "warn", "temperature", "airflow"),
    ("pcie narrow", lambda r: [s.update(pcie_width=8) for s in samples(r)], "pcie", "fail", "x8 under load", "reseat"),
    ("pcie gen", lambda r: [s.update(pcie_gen=3) for s in samples(r)], "pcie", "warn", "gen3", "BIOS"),
    (
        "hot",
        lambda r: samples(r)[3].update(temperature_c=slowdown(r) - 3),
        "temperature",
        "fail",
        "3 C margin",
        "cooling",
    ),
    (
        "warm",
        lambda r: samples(r)[3].update(temperature_c=slowdown(r) - 8),
        "temperature",
        "warn",
        "8 C margin",
        "airflow",
    ),
    (
        "power capped",
        lambda r: dev(r).update(power_limit_enforced_mw=dev(r)["power_limit_default_mw"] // 2),
        "power_limit",
        "warn",
        "the card is power-capped",
        "-pl",
    ),
    ("mig on", lambda r: dev(r).update(mig_mode=[1, 1]), "mig", "warn", "MIG is on", "-mig 0"),
    (
        "other process",
        lambda r: dev(r).update(processes=[{"pid": 999, "used_memory": 12 * GiB}]),
        "memory_in_use",
        "warn",
        "999 (12.0 GiB)",
        "stop them",
    ),
    (
        "own process ignored",
        lambda r: dev(r).update(processes=[{"pid": r["process"]["pid"], "used_memory": 12 * GiB}]),
        "memory_in_use",
        "ok",
        "0 other process",
        "",
    ),
    (
        "bf16 wrong",
        lambda r: r["matmul_accuracy"]["bf16"].update(max_rel_error=0.2),
        "matmul_accuracy",
        "fail",
        "bf16 matmul",
        "do not train on it",
    ),
    (
        "fp16 nan",
        lambda r: r["matmul_accuracy"]["fp16"].update(finite=False),
        "matmul_accuracy",
        "fail",
        "fp16 matmul",
        "do not train on it",
    ),
    (
        "slow",
        lambda r: r["load"].update(tflops_windows=[1.0, *[0.7 * reference(r)] * 2]),
        "matmul_tflops",
        "fail",
        "0.70x the",
        "clock_events",
    ),
    (
        "slow h2d",
        lambda r: r["bandwidth"].update(h2d_pinned_gbps=12.0),
        "bandwidth",
        "warn",
        "host-to-device 12.0 GB/s",
        "NUMA",
    ),
    (
        "driver too old",
        lambda r: r["nvml"].update(driver_version="535.104.05", cuda_driver_version="12.2"),
        "driver_cuda",
        "fail",
        "too old for torch's CUDA 13.0 (needs >= 580.65.06)",
        "torch2.3-cu121-py312",
    ),
]


@pytest.mark.parametrize("fault", GPU_FAULTS, ids=[f[0] for f in GPU_FAULTS])
def test_gpu_fault_is_caught(healthy, fault) -> None:
    assert_fault_caught(healthy, fault)


def test_unknown_gpu_gets_no_verdict_on_speed(healthy) -> None:
    dev(healthy)["name"] = "NVIDIA Future GPU 9000"
    assert severities(healthy, "matmul_tflops") == ["n/a"]
