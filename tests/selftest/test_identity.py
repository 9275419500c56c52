"""Identity and compatibility decisions: no GPU, hidden GPUs, a CPU torch, and a GPU torch has no kernels for."""

from __future__ import annotations

from builder.selftest import report_from_readings
from builder.selftest.probes import GPU_STAGES, PROBES
from tests.selftest.conftest import findings, load_readings, only


def test_cpu_only_machine_fails_clearly_with_a_remedy() -> None:
    """Recorded on the CI machine itself: no NVIDIA driver at all."""
    report = report_from_readings(load_readings("cpu_only"))
    failed = [f for f in report.findings if f.severity == "fail"]
    assert [f.check for f in failed] == ["nvidia_driver"]
    assert failed[0].message.startswith("no NVIDIA driver / GPU")
    assert "nvidia-smi" in failed[0].remediation
    # Everything that needs the GPU says so instead of passing.
    assert all(f.severity == "n/a" for f in report.findings if f.group in ("health", "numerics"))


def test_cuda_visible_devices_empty_on_the_h100() -> None:
    """Captured on the H100 with CUDA_VISIBLE_DEVICES="": one failure, naming the variable, and no second
    'no kernel image' failure from torch's (then empty) architecture list."""
    report = report_from_readings(load_readings("no_visible_devices"))
    failed = [f for f in report.findings if f.severity == "fail"]
    assert [f.check for f in failed] == ["nvidia_driver"]
    assert "CUDA sees none: CUDA_VISIBLE_DEVICES=''" in failed[0].message
    assert "unset CUDA_VISIBLE_DEVICES" in failed[0].remediation
    assert {f.severity for f in findings(report.readings, "gpu_arch")} == {"n/a"}


def test_hidden_gpus_name_cuda_visible_devices(healthy) -> None:
    healthy["torch"].update(cuda_available=False, device_count=0, devices=[])
    healthy["process"]["cuda_visible_devices"] = ""
    for probe in PROBES:  # the collector runs no GPU probe without a CUDA device
        if probe.stage in GPU_STAGES:
            healthy.pop(probe.name, None)
    f = only(healthy, "nvidia_driver")
    assert f.severity == "fail"
    assert "CUDA sees none: CUDA_VISIBLE_DEVICES=''" in f.message
    assert "unset CUDA_VISIBLE_DEVICES" in f.remediation
    assert {x.severity for x in findings(healthy, "sdpa_backends")} == {"n/a"}


def test_cpu_build_of_torch(healthy) -> None:
    healthy["torch"].update(version="2.11.0+cpu", cuda=None, cuda_available=False, device_count=0)
    f = only(healthy, "nvidia_driver")
    assert f.severity == "fail" and "CPU-only build" in f.message
    assert "catalog image" in f.remediation


def test_gpu_without_kernels_in_torch_names_the_image_that_runs(healthy) -> None:
    """An RTX 5090 (sm_120) under torch 2.3's cu121 build, which stops at sm_90."""
    d = healthy["nvml"]["devices"][0]
    d.update(name="NVIDIA GeForce RTX 5090", compute_capability=[12, 0])
    healthy["torch"].update(
        version="2.3.0+cu121", cuda="12.1", arch_list=["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    )
    f = only(healthy, "gpu_arch")
    assert f.severity == "fail"
    assert "is sm_120" in f.message and "no kernel image is available" in f.message
    assert "torch2.11-cu130-py312" in f.remediation and "torch2.8-cu128-py312" in f.remediation


def test_ptx_only_is_a_warning(healthy) -> None:
    healthy["torch"]["arch_list"] = ["sm_80", "compute_80"]
    healthy["nvml"]["devices"][0].update(name="NVIDIA GeForce RTX 5090", compute_capability=[8, 9])
    healthy["nvml"]["devices"][0]["compute_capability"] = [8, 9]
    assert only(healthy, "gpu_arch").severity == "ok"  # sm_80 SASS runs on 8.9
    healthy["nvml"]["devices"][0]["compute_capability"] = [9, 0]
    assert only(healthy, "gpu_arch").severity == "warn"


def test_driver_new_enough(healthy) -> None:
    healthy["nvml"]["driver_version"] = "590.10"
    assert only(healthy, "driver_cuda").severity == "ok"
