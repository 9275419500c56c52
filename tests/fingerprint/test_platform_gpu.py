"""builder/platform.py picks the catalog entry an instance replicates, or names the base image to rent;
builder/gpucheck.py says which image runs on a GPU the user names, and why not."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from builder import platform
from builder.errors import SameboxError
from builder.gpucheck import DOES_NOT_RUN, RUNS, RUNS_WITHOUT_FLASH_ATTN, check_gpu
from builder.spec import load_catalog

ENTRIES = [
    {"id": "torch2.3-cu121-py312", "torch": "2.3.0", "torch_local": "cu121", "python": "3.12",
     "python_provider": "conda", "flash_attn": "2.7.4.post1",
     "platforms": ["AutoDL: PyTorch 2.3.0 / Python 3.12(ubuntu22.04) / CUDA 12.1"]},
    {"id": "torch2.5-cu124-py312", "torch": "2.5.1", "torch_local": "cu124", "python": "3.12",
     "python_provider": "conda", "flash_attn": "2.7.4.post1",
     "platforms": ["AutoDL: PyTorch 2.5.1 / Python 3.12(ubuntu22.04) / CUDA 12.4"]},
    {"id": "test-py311", "torch": "none", "torch_local": "none", "python": "3.11", "python_provider": "system",
     "flash_attn": "none", "platforms": ["test: Debian 12"]},
]


def _plat(torch: str = "2.3.0+cu121", python: str = "3.12") -> platform.Platform:
    return platform.Platform(python=python, python_full=python + ".3", executable="/root/miniconda3/bin/python",
                             torch=torch, torch_cuda="12.1", gpus=("NVIDIA GeForce RTX 4090",), driver="550.54.14",
                             autodl=True, autodl_region="west-b")


def test_the_fitting_entry_is_picked() -> None:
    assert platform.match_entry(_plat(), ENTRIES)["id"] == "torch2.3-cu121-py312"
    assert platform.match_entry(_plat("none", "3.11"), ENTRIES)["id"] == "test-py311"


def test_torch_mismatch_names_the_base_image_to_pick() -> None:
    with pytest.raises(platform.PlatformMismatch) as e:
        platform.match_entry(_plat(), ENTRIES, image="torch2.5-cu124-py312")
    msg = str(e.value)
    assert "needs torch 2.5.1+cu124" in msg and "has torch 2.3.0+cu121" in msg
    assert "'AutoDL: PyTorch 2.5.1 / Python 3.12(ubuntu22.04) / CUDA 12.4'" in msg
    assert "--image torch2.3-cu121-py312" in msg


def test_unknown_platform_lists_the_base_images() -> None:
    with pytest.raises(platform.PlatformMismatch) as e:
        platform.match_entry(_plat("2.4.1+cu121"), ENTRIES)
    assert "no catalog image replicates this instance" in str(e.value)
    assert "'AutoDL: PyTorch 2.3.0 / Python 3.12(ubuntu22.04) / CUDA 12.1' -> torch2.3-cu121-py312" in str(e.value)
    with pytest.raises(platform.PlatformMismatch, match="no catalog image 'nope'"):
        platform.match_entry(_plat(), ENTRIES, image="nope")


def test_shell_assignments_are_quoted_for_eval() -> None:
    plat = _plat()
    text = platform.shell_assignments(plat, ENTRIES[0])
    out = subprocess.run(["bash", "-c", text + 'printf "%s|%s|%s" "$SB_IMAGE" "$SB_GPUS" "$SB_PLATFORM"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == f"torch2.3-cu121-py312|NVIDIA GeForce RTX 4090|{plat.describe()}"
    assert "AutoDL (west-b)" in plat.describe()
    assert all(shlex.split(line) for line in text.splitlines())


def test_main_reads_a_json_catalog_and_exits_2_on_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(ENTRIES[:2]))
    assert platform.main(["--catalog", str(catalog)]) == 2  # this interpreter is not torch 2.3/2.5 on 3.12
    assert "Rent one of these base images" in capsys.readouterr().err
    assert platform.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["executable"]


def test_detect_reads_autodl_markers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AutoDLRegion", "beijing-a")
    monkeypatch.setattr(platform, "_torch_facts", lambda: ("none", "none", ""))
    plat = platform.detect()
    assert plat.autodl and plat.autodl_region == "beijing-a"


@pytest.mark.parametrize(("name", "cc"), [
    ("RTX 4090", "8.9"), ("4090D", "8.9"), ("H20", "9.0"), ("A800", "8.0"), ("vGPU-32GB", "8.9"),
    ("RTX 5090", "12.0"), ("V100-32GB", "7.0"), ("NVIDIA GeForce RTX 4090 D", "8.9"),
])
def test_user_gpu_names_are_understood(name: str, cc: str) -> None:
    assert check_gpu(name, load_catalog())["compute_capability"] == cc


def _verdicts(report: dict) -> dict[str, str]:
    return {v["image"]: v["verdict"] for v in report["images"]}


def test_rtx_5090_needs_a_cuda_12_8_build() -> None:
    report = check_gpu("RTX 5090", load_catalog())
    verdicts = _verdicts(report)
    assert verdicts["torch2.3-cu121-py312"] == DOES_NOT_RUN
    assert verdicts["torch2.8-cu128-py312"] == RUNS
    reason = next(v["reasons"][0] for v in report["images"] if v["image"] == "torch2.3-cu121-py312")
    assert "sm_120" in reason and "no kernel image" in reason
    assert report["best"] == "torch2.11-cu130-py312"


def test_an_old_driver_rules_out_new_cuda_and_moves_the_best_image() -> None:
    report = check_gpu("RTX 4090", load_catalog(), driver="535.54.03")
    verdicts = _verdicts(report)
    assert verdicts["torch2.5-cu124-py312"] == DOES_NOT_RUN
    assert verdicts["torch2.3-cu121-py312"] == RUNS
    assert report["best"] == "torch2.3-cu121-py312"
    reason = next(v["reasons"][0] for v in report["images"] if v["image"] == "torch2.11-cu130-py312")
    assert "driver 535.54.03 is older than CUDA 13.0 needs (580.65.06)" == reason


def test_v100_runs_without_flash_attn_and_not_on_cuda_12_8() -> None:
    report = check_gpu("V100-32GB", load_catalog())
    verdicts = _verdicts(report)
    assert verdicts["torch2.3-cu121-py312"] == RUNS_WITHOUT_FLASH_ATTN
    assert verdicts["torch2.8-cu128-py312"] == DOES_NOT_RUN
    assert report["best"] in {s for s, v in verdicts.items() if v == RUNS_WITHOUT_FLASH_ATTN}


def test_unknown_gpu_and_bad_driver_are_user_errors() -> None:
    with pytest.raises(SameboxError, match="unknown GPU 'GTX 1080'"):
        check_gpu("GTX 1080", load_catalog())
    with pytest.raises(SameboxError, match="not a version"):
        check_gpu("H20", load_catalog(), driver="latest")


def test_flash_attn2_gpu_decision() -> None:
    from builder.platform import flash_attn2_gpus

    assert flash_attn2_gpus(("NVIDIA GeForce RTX 4090",)) == "yes"
    assert flash_attn2_gpus(("Tesla V100-SXM2-32GB", "Tesla T4")) == "no"
    assert flash_attn2_gpus(("Tesla V100-SXM2-32GB", "NVIDIA A100-SXM4-80GB")) == "yes"
    assert flash_attn2_gpus(("Some Future GPU",)) == "yes", "unknown cards go to the resolver, which decides"
