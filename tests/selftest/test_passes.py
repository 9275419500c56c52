"""builder/selftest/passes.py: a passing self-test is remembered for the boot, GPUs and environment it ran on; a run
that matches them takes its kernel findings and re-runs the rest; anything that differs runs everything again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder.cli import main
from builder.core.attention_needs import AttentionNeeds
from builder.selftest import passes, readings, runner
from builder.selftest.findings import Finding
from builder.selftest.probes import KERNELS
from builder.selftest.registry import CHECKS, judge
from builder.selftest.report import JSON_SCHEMA, schema_problems

KERNEL_OF = {c.name: c.probe.kernel for c in CHECKS if c.probe is not None and c.probe.kernel is not None}


@pytest.fixture
def boot(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "boot_id"
    path.write_text("2b1c0e6e-boot-one\n")
    monkeypatch.setattr(passes, "BOOT_ID", path)
    return path


@pytest.fixture
def env_key(monkeypatch) -> list[str]:
    key = ["env-1"]
    monkeypatch.setattr(passes, "environment_key", lambda: key[0])
    return key


def remembered(healthy: dict[str, Any], path: Path) -> dict[str, Any]:
    healthy.setdefault("kernels", list(KERNELS))
    assert passes.remember(healthy, judge(healthy), KERNEL_OF, path)
    return json.loads(path.read_text())


def test_a_pass_is_reused_only_on_the_same_boot_gpus_environment_and_coverage(healthy, boot, env_key,
                                                                              tmp_path: Path) -> None:
    path = tmp_path / "pass.json"
    record = remembered(healthy, path)
    nvml = healthy["nvml"]
    assert {f["check"] for f in record["findings"]} <= set(KERNEL_OF) and record["findings"]
    kernels = tuple(healthy["kernels"])
    default = AttentionNeeds("default")
    assert passes.reusable(nvml, kernels, default, path) is not None
    # A plain model at a tested head dim is covered by the default head dims; one with a sliding window is not.
    assert passes.reusable(nvml, ("flash-attn",), AttentionNeeds("qwen", (128,)), path) is not None
    assert passes.reusable(nvml, ("flash-attn",), AttentionNeeds("mistral", (128,), window=4096,
                                                                   features=("local",)), path) is None
    assert passes.reusable(nvml, ("flash-attn",), AttentionNeeds("odd", (96,)), path) is None

    other_gpu = json.loads(json.dumps(nvml))
    other_gpu["devices"][0]["uuid"] = "GPU-another-card"
    assert passes.reusable(other_gpu, kernels, default, path) is None
    env_key[0] = "env-2"  # a package installed, upgraded or rebuilt
    assert passes.reusable(nvml, kernels, default, path) is None
    env_key[0] = "env-1"
    boot.write_text("after-a-reboot\n")
    assert passes.reusable(nvml, kernels, default, path) is None


def test_a_pass_that_did_not_test_a_kernel_does_not_cover_it(healthy, boot, env_key, tmp_path: Path) -> None:
    healthy["kernels"] = ["sdpa"]  # the run that passed tested SDPA only
    path = tmp_path / "pass.json"
    remembered(healthy, path)
    assert passes.reusable(healthy["nvml"], ("sdpa",), AttentionNeeds("default"), path) is not None
    assert passes.reusable(healthy["nvml"], ("sdpa", "bitsandbytes"), AttentionNeeds("default"), path) is None


def test_failures_cpu_runs_and_reused_runs_are_not_remembered(healthy, boot, env_key, tmp_path: Path) -> None:
    path = tmp_path / "pass.json"
    failed = [*judge(healthy), Finding("fail", "ECC: 3 uncorrectable errors", "drain the GPU", "ecc", "health")]
    assert not passes.remember(healthy, failed, KERNEL_OF, path)
    cpu = json.loads(json.dumps(healthy))
    cpu["torch"]["cuda_available"] = False
    assert not passes.remember(cpu, judge(healthy), KERNEL_OF, path)
    healthy["reused"] = {"passed_at": 0}
    assert not passes.remember(healthy, judge(healthy), KERNEL_OF, path)
    assert not path.exists()
    # Unreadable or foreign files are no pass.
    for text in ("{broken", json.dumps([1, 2]), json.dumps({"version": 99})):
        path.write_text(text)
        assert passes.reusable(healthy["nvml"], ("sdpa",), AttentionNeeds("default"), path) is None


def test_a_reusing_run_takes_the_kernel_findings_and_runs_the_rest(healthy, boot, env_key, tmp_path: Path,
                                                                   monkeypatch) -> None:
    path = tmp_path / "pass.json"
    remembered(healthy, path)
    monkeypatch.setattr(passes, "pass_path", lambda: path)
    monkeypatch.setattr(runner, "read_nvml", lambda: healthy["nvml"])
    asked: list[tuple[str, ...]] = []

    def collect(mode, needs, data_dir=None, lockfile=None, kernels=()):
        asked.append(tuple(kernels))
        fresh = json.loads(json.dumps(healthy))
        fresh["kernels"] = list(kernels)
        for name in ("flash_attn", "bitsandbytes", "sdpa_backends", "fused_layers"):
            if name in fresh and KERNEL_OF[name] not in kernels:
                fresh[name] = dict(readings.NOT_NEEDED)
        return fresh

    monkeypatch.setattr(runner, "collect", collect)
    kernels = ("flash-attn", "sdpa", "bitsandbytes")
    report = runner.run_selftest("quick", kernels=kernels, reuse=True)
    assert asked == [()]  # no kernel library imported or tested
    reused = [f for f in report.findings if "not run again" in f.message]
    assert {f.check for f in reused} == {c for c, k in KERNEL_OF.items() if k in kernels} & \
        {f["check"] for f in json.loads(path.read_text())["findings"]}
    assert all(f.check != "fused_layers" for f in reused)  # the run does not use it
    assert report.readings["reused"]["checks"] and not report.failed
    assert schema_problems(report.to_dict(), JSON_SCHEMA) == []
    # the health and load checks were judged from this run's readings
    assert any(f.check == "matmul_tflops" and "not run again" not in f.message for f in report.findings)

    # Without --reuse, or in full mode, everything runs.
    asked.clear()
    runner.run_selftest("quick", kernels=kernels)
    runner.run_selftest("full", kernels=kernels, reuse=True)
    assert asked == [kernels, kernels]


def test_reuse_all_tests_nothing_where_a_pass_covers_the_run(healthy, boot, env_key, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    path = tmp_path / "pass.json"
    remembered(healthy, path)
    monkeypatch.setattr(passes, "pass_path", lambda: path)
    monkeypatch.setattr(runner, "read_nvml", lambda: healthy["nvml"])
    monkeypatch.setattr(runner, "collect", lambda *a, **k: pytest.fail("reuse all must not test"))
    assert main(["selftest", "--quick", "--reuse", "all", "--kernels", "sdpa"]) == 0
    assert "not run again" in capsys.readouterr().out
    assert main(["selftest", "--quick", "--reuse", "all", "--kernels", "sdpa", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert schema_problems(report, JSON_SCHEMA) == [] and not report["failed"]
    assert report["findings"] and all("not run again" in f["message"] for f in report["findings"])
    # full's own checks, a named lockfile or a data disk are never stood in for by a remembered pass
    for extra in (["--full"], ["--lockfile", str(path)], ["--data-dir", str(tmp_path)]):
        with pytest.raises(pytest.fail.Exception, match="reuse all must not test"):
            main(["selftest", "--reuse", "all", "--kernels", "sdpa", *extra])
    boot.write_text("another-boot\n")
    monkeypatch.setattr(runner, "collect", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("tested")))
    with pytest.raises(RuntimeError, match="tested"):
        main(["selftest", "--quick", "--reuse", "all", "--kernels", "sdpa"])


def test_environment_key_changes_with_an_installed_distribution(tmp_path: Path, monkeypatch) -> None:
    from builder.core import environment
    from tests.fingerprint.fakesite import add_dist

    site = tmp_path / "site"
    add_dist(site, "alpha", "1.0")
    monkeypatch.setattr(passes, "installed_distributions",
                        lambda path: environment.installed_distributions([str(site)]))
    first = passes.environment_key()
    assert passes.environment_key() == first
    add_dist(site, "beta", "2.0")
    assert passes.environment_key() != first


def test_a_narrower_pass_keeps_what_the_wider_one_covered(healthy, boot, env_key, tmp_path: Path) -> None:
    path = tmp_path / "pass.json"
    remembered(healthy, path)  # every kernel
    narrow = json.loads(json.dumps(healthy))
    narrow["kernels"] = ["sdpa"]
    assert passes.remember(narrow, [f for f in judge(narrow) if f.check in ("sdpa_backends", "ecc")], KERNEL_OF, path)
    record = json.loads(path.read_text())
    assert set(record["kernels"]) == set(KERNELS)
    assert passes.reusable(healthy["nvml"], tuple(KERNELS), AttentionNeeds("default"), path) is not None
    assert {f["check"] for f in record["findings"]} >= {"sdpa_backends", "bitsandbytes"}
