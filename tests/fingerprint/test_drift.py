"""builder/instance/drift.py: every kind of drift lands in its group; the machine alone is not drift; the live
environment is checked against a lockfile, and a setup run plans exactly what is missing or broken."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from builder.core import environment
from builder.instance import drift
from tests.fingerprint.fakesite import add_dist, lock_line

BASE: dict[str, Any] = {
    "env": {"HF_HOME": "/root/.cache/huggingface"},
    "machine": {"driver": "550.54.14", "gpus": [{"compute_capability": "8.9", "memory_mib": 24564,
                                                 "name": "NVIDIA GeForce RTX 4090"}]},
    "nvcc": "12.1.105",
    "os": {"glibc": "glibc 2.35", "id": "ubuntu", "version_id": "22.04"},
    "packages": {
        "numpy": {"version": "1.26.4", "record": "a" * 64, "modified": []},
        "peft": {"version": "0.11.1", "record": "b" * 64, "modified": []},
        "torch": {"version": "2.3.0+cu121", "record": "c" * 64, "modified": []},
    },
    "pip_config": [],
    "python": {"version": "3.12.3", "implementation": "CPython", "executable": "/root/miniconda3/bin/python"},
    "schema": 1,
    "torch": {"version": "2.3.0+cu121", "cuda": "12.1", "cudnn": 8902, "cxx11abi": False, "arch_list": ["sm_80"]},
}


def _with(**changes: Any) -> dict[str, Any]:
    fp = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = fp
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return fp


def _groups(report: dict[str, Any]) -> dict[str, list[str]]:
    return {g: [i["what"] for i in items] for g, items in report["groups"].items() if items}


def test_identical_fingerprints_have_no_drift() -> None:
    report = drift.diff_fingerprints(BASE, copy.deepcopy(BASE))
    assert report["drift"] is False and _groups(report) == {}
    assert drift.format_diff(report).endswith("drift: none")


@pytest.mark.parametrize(("changes", "group", "what"), [
    ({"packages__numpy__version": "2.0.0"}, "packages changed", "numpy"),
    ({"packages__extra": {"version": "1.0", "record": "d" * 64, "modified": []}}, "packages added", "extra"),
    ({"packages__peft": None}, "packages removed", "peft"),
    ({"packages__peft__modified": ["peft/tuners/lora.py"]}, "files changed", "peft"),
    ({"packages__peft__record": "e" * 64}, "files changed", "peft"),
    ({"torch__version": "2.3.0+cu118"}, "torch/cuda", "torch.version"),
    ({"torch__cxx11abi": True}, "torch/cuda", "torch.cxx11abi"),
    ({"nvcc": "12.4.131"}, "torch/cuda", "nvcc"),
    ({"python__version": "3.12.4"}, "python/os", "python.version"),
    ({"os__glibc": "glibc 2.39"}, "python/os", "os.glibc"),
])
def test_each_kind_of_drift_is_detected_in_its_group(changes: dict[str, Any], group: str, what: str) -> None:
    report = drift.diff_fingerprints(BASE, _with(**changes))
    assert report["drift"] is True
    assert what in _groups(report)[group]


def test_machine_and_settings_are_reported_apart_from_drift() -> None:
    other = _with(machine__driver="570.86.10", env__HF_HOME="/root/autodl-tmp/hf")
    other["machine"]["gpus"][0]["name"] = "NVIDIA H20"
    report = drift.diff_fingerprints(BASE, other)
    assert report["drift"] is False
    assert set(_groups(report)) == {"machine", "settings"}
    assert "(not drift)" in drift.format_diff(report)


def test_read_pins_parses_a_hashed_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\n--index-url https://pypi.org/simple\n" + lock_line("Jinja2", "3.1.4")
                    + lock_line("nvidia-cublas-cu12", "12.1.3.1") + "torch==2.3.0+cu121 \\\n    --hash=sha256:ab\n"
                    + "accelerate[torch]==0.30.1 --hash=sha256:cd  # via peft\n")
    pins = {p.name: p for p in drift.read_pins(lock)}
    assert {n: p.version for n, p in pins.items()} == {
        "jinja2": "3.1.4", "nvidia-cublas-cu12": "12.1.3.1", "torch": "2.3.0+cu121", "accelerate": "0.30.1"}
    assert [n for n, p in pins.items() if p.platform_provided] == ["nvidia-cublas-cu12", "torch"]
    assert pins["jinja2"].block.startswith("Jinja2==3.1.4 \\\n    --hash=sha256:")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    real = environment.installed_distributions
    monkeypatch.setattr(environment, "installed_distributions", lambda path=None: real([str(site)]))
    monkeypatch.setattr(drift.site, "getsitepackages", lambda: [str(site)])
    monkeypatch.setattr(drift.site, "getusersitepackages", lambda: str(tmp_path / "nouser"))
    return site


def test_verify_lock_reports_missing_wrong_modified_and_platform_torch(site: Path, tmp_path: Path) -> None:
    add_dist(site, "alpha", "1.0")
    add_dist(site, "beta", "1.5")
    add_dist(site, "gamma", "3.0")
    add_dist(site, "torch", "2.3.0+cu118")
    (site / "gamma" / "__init__.py").write_text("changed = True\n")
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_line("alpha", "1.0") + lock_line("beta", "2.0") + lock_line("gamma", "3.0")
                    + lock_line("delta", "4.0") + lock_line("torch", "2.3.0"))
    problems = drift.verify_lock(lock, torch="2.3.0+cu121")
    assert problems == [
        "beta is 1.5, the lock has 2.0",
        "delta 4.0 is locked but not installed",
        "gamma 3.0: 1 file(s) differ from its RECORD (gamma/__init__.py)",
        "torch is 2.3.0+cu118, the image expects 2.3.0+cu121",
    ]
    assert drift.verify_lock(lock, torch="2.3.0+cu118", check_files=False) == [
        "beta is 1.5, the lock has 2.0", "delta 4.0 is locked but not installed"]


def test_plan_install_skips_platform_packages_and_cleans_interrupted_installs(site: Path, tmp_path: Path) -> None:
    add_dist(site, "alpha", "1.0")
    add_dist(site, "beta", "2.0", record=False)  # pip killed before it wrote RECORD
    (site / "~eta").mkdir()  # pip's stash of a half-uninstalled package
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_line("alpha", "1.0") + lock_line("beta", "2.0") + lock_line("nvidia-nccl-cu12", "2.20.5")
                    + lock_line("triton", "2.3.0"))
    todo, why = drift.plan_install(lock)
    assert [p.name for p in todo] == ["beta"]
    assert why == ["beta 2.0 is locked but not installed"]
    assert not (site / "~eta").exists() and not (site / "beta-2.0.dist-info").exists()
    assert drift.is_intact("alpha", "1.0") and not drift.is_intact("alpha", "1.1") and not drift.is_intact("beta")


def test_drift_main_plan_writes_requirements_with_hashes(site: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(lock_line("alpha", "1.0") + lock_line("torch", "2.3.0"))
    out = tmp_path / "todo.txt"
    assert drift.main(["plan", "--lock", str(lock), "--out", str(out)]) == 0
    assert out.read_text() == "alpha==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert drift.main(["platform", "--lock", str(lock)]) == 1
    assert "torch 2.3.0 is locked but not installed" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "provided"), [
    ("torch", True), ("triton", True), ("pytorch-triton", True), ("nvidia-cudnn-cu12", True),
    ("Nvidia_NCCL_cu12", True), ("cuda-toolkit", True), ("cuda-bindings", True),
    ("nvidia-ml-py", False), ("numpy", False), ("transformers", False), ("torchvision", False)])
def test_platform_packages(name: str, provided: bool) -> None:
    """What the platform brings with torch: setup verifies these and installs everything else."""
    from builder.core.lockfile import LockedPackage, is_platform_package

    assert is_platform_package(name) is provided
    assert LockedPackage(environment.canonical_name(name), "1").platform_provided is provided


def test_setup_steps_run_on_the_standard_library(tmp_path: Path) -> None:
    """setup.sh runs `python -m builder.instance.drift` on an interpreter with nothing installed, Python 3.10
    included: no third-party import (-S drops site-packages) and no tomllib (3.11+) on the way to reading a lock."""
    import subprocess
    import sys

    lock = tmp_path / "lock.txt"
    lock.write_text(lock_line("alpha", "1.0") + lock_line("torch", "2.3.0"))
    out = tmp_path / "todo.txt"
    repo = Path(__file__).resolve().parents[2]
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from builder.instance import drift; "
              "rc = drift.main(['plan', '--lock', sys.argv[2], '--out', sys.argv[3]]); "
              "banned = sorted(m for m in sys.modules if m in ('tomllib', 'builder.core.spec', 'builder.image.lock')); "
              "print('imported:', banned, file=sys.stderr); sys.exit(rc or int(bool(banned)))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(repo), str(lock), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "alpha==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"


def test_platform_libraries_are_reported_apart_from_drift(tmp_path) -> None:
    from importlib.metadata import version

    from builder.instance.drift import split_lock_problems

    h = " \\\n    --hash=sha256:" + "0" * 64 + "\n"
    lock = tmp_path / "lock.txt"
    lock.write_text(f"triton==0.0.1{h}torch==0.0.1{h}jinja2==0.0.1{h}packaging=={version('packaging')}{h}")
    drift, platform = split_lock_problems(lock, check_files=False)
    assert any(p.startswith("triton") for p in platform) and len(platform) == 1
    assert any(p.startswith("torch") for p in drift) and any(p.startswith("jinja2") for p in drift)
    assert not any(p.startswith("packaging") for p in drift + platform)
