"""The self-test's GPU benchmarks on the CPU: bench/selftest_gpu.py turns captures and --out reports into the
fixtures the self-test's tests judge (the recorded fixtures come back unchanged; a version 1 report comes out in the
current layout), its fault injections put the faulty reading where the checks look, and
bench/multigpu_selftest.py judges an all-reduce reading with the self-test's check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.selftest import kernel_probes
from builder.selftest.probes import PROBES
from builder.selftest.readings import READINGS_VERSION
from builder.selftest.registry import checks_for, judge
from tests.conftest import REPO
from tests.selftest.conftest import FIXTURES
from tests.selftest.test_registry import CONTEXT_KEYS

CAPTURES = {"quick": "healthy_quick", "full": "healthy_full", "no_visible_devices": "no_visible_devices"}
V1_REPORT = REPO / "bench" / "results" / "selftest_gpu.json"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def healthy() -> dict[str, Any]:
    return fixture("healthy_quick")


@pytest.mark.parametrize("script", ["selftest_gpu.py", "multigpu_selftest.py"])
def test_help_runs_without_a_gpu(script: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout


def test_to_fixtures_gives_back_the_recorded_captures(tmp_path: Path) -> None:
    """Each fixture captured by --capture, handed back as a capture, is written out unchanged (its label too)."""
    import selftest_gpu

    capture, written = tmp_path / "capture", tmp_path / "fixtures"
    capture.mkdir()
    written.mkdir()
    for name, fixture_name in CAPTURES.items():
        readings = fixture(fixture_name)
        readings.pop("fixture_source")
        (capture / f"{name}.json").write_text(json.dumps(readings))
    selftest_gpu.to_fixtures(capture, fixtures=written)
    assert sorted(p.stem for p in written.glob("*.json")) == sorted(CAPTURES.values())
    for fixture_name in CAPTURES.values():
        assert json.loads((written / f"{fixture_name}.json").read_text()) == fixture(fixture_name)


def test_the_flash_attn_fixture_is_the_reports_quick_reading(tmp_path: Path, healthy: dict[str, Any]) -> None:
    import selftest_gpu

    report = tmp_path / "selftest_gpu.json"
    report.write_text(json.dumps({"quick": {"readings": healthy}}))
    selftest_gpu.to_fixtures(tmp_path / "no_capture", report, fixtures=tmp_path)
    written = json.loads((tmp_path / "flash_attn_slim.json").read_text())
    source = written.pop("fixture_source")
    assert written == healthy["flash_attn"]
    assert source == "the quick run's flash_attn reading in selftest_gpu.json on NVIDIA H100 80GB HBM3"


def test_a_version_1_report_becomes_current_fixtures(tmp_path: Path) -> None:
    """bench/results/selftest_gpu.json was recorded with readings grouped under "gpu" and "env" and four probes
    under their old names; what --to-fixtures writes from it is in the current layout and judged by every check."""
    import selftest_gpu

    report = json.loads(V1_REPORT.read_text())
    old = report["quick"]["readings"]
    assert old["readings_version"] == 1
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "quick.json").write_text(json.dumps(old))
    selftest_gpu.to_fixtures(capture, V1_REPORT, fixtures=tmp_path)

    readings = json.loads((tmp_path / "healthy_quick.json").read_text())
    assert readings["readings_version"] == READINGS_VERSION
    assert not set(readings) - CONTEXT_KEYS - {p.name for p in PROBES}
    assert readings["lockfile"] == old["env"]["lock"]
    assert readings["matmul_accuracy"] == old["gpu"]["accuracy"]
    assert readings["sdpa_backends"] == old["gpu"]["sdpa"]
    judged = {f.check for f in judge(readings)}
    assert judged == {c.name for c in checks_for("quick")}

    slim = json.loads((tmp_path / "flash_attn_slim.json").read_text())
    assert slim.pop("fixture_source").startswith("the quick run's flash_attn reading in selftest_gpu.json on NVIDIA")
    assert slim == old["gpu"]["flash_attn"]


def test_current_readings_are_left_as_they_are(healthy: dict[str, Any]) -> None:
    import selftest_gpu

    assert selftest_gpu.as_current(healthy) == healthy


def test_lock_drift_fault_is_judged_by_the_lockfile_check(healthy: dict[str, Any]) -> None:
    import selftest_gpu

    result = selftest_gpu.fault_lock_drift(healthy)
    assert [f["severity"] for f in result["findings"]] == ["fail"]
    assert "the lock has 4.40.0" in result["findings"][0]["message"]


def test_sliding_window_fault_is_judged_against_the_model_it_injects(
    healthy: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slim build's recorded reading (no local attention) under a model with a sliding window: a failure."""
    import selftest_gpu

    slim = {k: v for k, v in fixture("flash_attn_slim").items() if k != "fixture_source"}
    monkeypatch.setattr(kernel_probes, "flash_attn", lambda head_dims, dtype, window: {**slim, "window": window})
    result = selftest_gpu.fault_sliding_window_slim(healthy)
    failed = [f["message"] for f in result["findings"] if f["severity"] == "fail"]
    assert any("built without sliding-window" in m for m in failed), result["findings"]


def test_sm80_only_fault_is_judged_by_the_flash_attn_check(
    healthy: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selftest_gpu

    extension = tmp_path / "flash_attn_2_cuda.so"
    extension.write_bytes(b"\x7fELF")
    monkeypatch.setattr(kernel_probes, "elf_archs", lambda path: ["8.0"])
    result = selftest_gpu.fault_sm80_flash_attn(healthy, extension)
    assert [f["severity"] for f in result["findings"]] == ["fail"]
    assert "kernels for sm_80 only; this GPU is sm_90" in result["findings"][0]["message"]


def test_multigpu_bench_judges_an_allreduce_reading_with_the_selftest_check() -> None:
    import multigpu_selftest

    pair = fixture("h200x2_handmade")
    found = multigpu_selftest.judged(pair["allreduce"], pair["nvml"])
    assert [f["severity"] for f in found] == ["ok", "ok"]
    assert "0.99x the nvlink:H200 reference" in found[1]["message"]
    wrong = multigpu_selftest.judged({**pair["allreduce"], "wrong_elements": 3}, pair["nvml"])
    assert [f["severity"] for f in wrong] == ["fail"]
