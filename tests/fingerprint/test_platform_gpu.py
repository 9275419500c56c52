"""builder/core/catalog.py picks the image an instance replicates (or names the base image to rent), the lockfile an
environment claims, and which image runs on a GPU the user names, and why not."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from builder.core.catalog import DOES_NOT_RUN, RUNS, RUNS_WITHOUT_FLASH_ATTN, Catalog, PlatformMismatch, check_gpu
from builder.core.environment import Gpu
from builder.core.errors import SameboxError
from tests.conftest import REPO
from tests.envs import make_env

ENTRIES = [
    {"id": "torch2.3-cu121-py312", "torch": "2.3.0", "torch_local": "cu121", "python": "3.12",
     "python_provider": "conda", "flash_attn": "2.7.4.post1",
     "platforms": ["AutoDL: PyTorch 2.3.0 / Python 3.12(ubuntu22.04) / CUDA 12.1"]},
    {"id": "torch2.5-cu124-py312", "torch": "2.5.1", "torch_local": "cu124", "python": "3.12",
     "python_provider": "conda", "flash_attn": "2.7.4.post1",
     "platforms": ["AutoDL: PyTorch 2.5.1 / Python 3.12(ubuntu22.04) / CUDA 12.4"]},
]
CATALOG = Catalog(Catalog.load().images + Catalog.load(REPO / "tests" / "fixtures" / "catalog").images)


def _env(torch: str | None = "2.3.0+cu121", python: str = "3.12"):
    return make_env(torch, "12.1" if torch else None, python, (("NVIDIA GeForce RTX 4090", "8.9"),),
                    driver="550.54.14", executable="/root/miniconda3/bin/python")


def test_the_fitting_entry_is_picked() -> None:
    assert CATALOG.match(_env()).id == "torch2.3-cu121-py312"
    assert CATALOG.match(_env(None, "3.11")).id == "test-bookworm-py311"


def test_torch_mismatch_names_the_base_image_to_pick() -> None:
    with pytest.raises(PlatformMismatch) as e:
        CATALOG.match(_env(), image="torch2.5-cu124-py312")
    msg = str(e.value)
    assert "needs torch 2.5.1+cu124" in msg and "has torch 2.3.0+cu121" in msg
    assert "'AutoDL: PyTorch 2.5.1 / Python 3.12(ubuntu22.04) / CUDA 12.4'" in msg
    assert "--image torch2.3-cu121-py312" in msg


def test_unknown_platform_lists_the_base_images() -> None:
    with pytest.raises(PlatformMismatch) as e:
        CATALOG.match(_env("2.4.1+cu121"))
    assert "no catalog image replicates this instance" in str(e.value)
    assert "'AutoDL: PyTorch 2.3.0 / Python 3.12(ubuntu22.04) / CUDA 12.1' -> torch2.3-cu121-py312" in str(e.value)
    with pytest.raises(SameboxError, match="no catalog image 'nope'"):
        CATALOG.match(_env(), image="nope")


def test_the_claimed_lockfile_follows_one_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env()
    spec = CATALOG.find("torch2.3-cu121-py312")
    monkeypatch.setattr("builder.core.catalog.IMAGE_LOCKFILE", tmp_path / "no-image-lock.txt")
    assert CATALOG.claimed_lockfile(env, "x.txt", environ={}).path == Path("x.txt")
    assert CATALOG.claimed_lockfile(env, image="torch2.5-cu124-py312", environ={}).image.id == "torch2.5-cu124-py312"
    recorded = CATALOG.claimed_lockfile(env, environ={"SAMEBOX_LOCKFILE": "/root/.samebox/lock.txt"})
    assert (recorded.path, recorded.claimed) == (Path("/root/.samebox/lock.txt"), True)
    by_image = CATALOG.claimed_lockfile(env, environ={"SAMEBOX_IMAGE": "torch2.8-cu128-py312"})
    assert by_image.claimed and by_image.image.id == "torch2.8-cu128-py312"
    nearest = CATALOG.claimed_lockfile(env, environ={})
    assert (nearest.path, nearest.claimed, nearest.image) == (spec.lockfile, False, spec)
    assert "nearest catalog image" in nearest.how
    none = CATALOG.claimed_lockfile(_env("2.4.1+cu121"), environ={})
    assert none.path is None and "no catalog image has torch 2.4.1+cu121" in none.how
    image_lock = tmp_path / "lock.txt"
    image_lock.write_text("")
    monkeypatch.setattr("builder.core.catalog.IMAGE_LOCKFILE", image_lock)
    inside = CATALOG.claimed_lockfile(env, environ={"SAMEBOX_IMAGE": "torch2.3-cu121-py312"})
    assert (inside.path, inside.claimed, inside.image) == (image_lock, True, spec)


def test_images_that_run_and_flash_attn_pins() -> None:
    assert "torch2.3-cu121-py312" not in CATALOG.images_that_run("12.0")
    assert "torch2.8-cu128-py312" in CATALOG.images_that_run("sm_120")
    assert CATALOG.images_that_run(None, "535.54.03") == ["torch2.1-cu121-py310", "torch2.3-cu121-py312"]
    py310 = CATALOG.find("torch2.1-cu121-py310")
    assert CATALOG.flash_attn_version("2.1.2+cu121", "12.1", "3.10") == py310.flash_attn
    assert CATALOG.flash_attn_version("9.9.0", "99.0", "3.12") == max(
        __import__("builder.core.compat", fromlist=["x"]).FLASH_ATTN_RELEASES,
        key=__import__("builder.core.compat", fromlist=["x"]).version_tuple)


def test_a_standalone_catalog_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([s.to_dict() for s in CATALOG.images]))
    assert Catalog.from_json(path) == CATALOG


def test_the_probe_reads_autodl_markers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.core.environment import probe_rental

    monkeypatch.setenv("AutoDLRegion", "beijing-a")
    rental = probe_rental()
    assert rental.autodl and rental.region == "beijing-a" and rental.describe() == "AutoDL (beijing-a)"


@pytest.mark.parametrize(("name", "cc"), [
    ("RTX 4090", "8.9"), ("4090D", "8.9"), ("H20", "9.0"), ("A800", "8.0"), ("vGPU-32GB", "8.9"),
    ("RTX 5090", "12.0"), ("V100-32GB", "7.0"), ("NVIDIA GeForce RTX 4090 D", "8.9"),
])
def test_user_gpu_names_are_understood(name: str, cc: str) -> None:
    assert check_gpu(name, Catalog.load())["compute_capability"] == cc


def _verdicts(report: dict) -> dict[str, str]:
    return {v["image"]: v["verdict"] for v in report["images"]}


def test_rtx_5090_needs_a_cuda_12_8_build() -> None:
    report = check_gpu("RTX 5090", Catalog.load())
    verdicts = _verdicts(report)
    assert verdicts["torch2.3-cu121-py312"] == DOES_NOT_RUN
    assert verdicts["torch2.8-cu128-py312"] == RUNS
    reason = next(v["reasons"][0] for v in report["images"] if v["image"] == "torch2.3-cu121-py312")
    assert "sm_120" in reason and "no kernel image" in reason
    assert verdicts["torch2.11-cu130-py312"] == RUNS
    # the newest torch that runs is only on the project's GPU test machine: the best image is one a user can rent
    assert report["best"] == "torch2.8-cu128-py312" and report["rent"].startswith("AutoDL: PyTorch 2.8.0")


def test_an_old_driver_rules_out_new_cuda_and_moves_the_best_image() -> None:
    report = check_gpu("RTX 4090", Catalog.load(), driver="535.54.03")
    verdicts = _verdicts(report)
    assert verdicts["torch2.5-cu124-py312"] == DOES_NOT_RUN
    assert verdicts["torch2.3-cu121-py312"] == RUNS
    assert report["best"] == "torch2.3-cu121-py312"
    reason = next(v["reasons"][0] for v in report["images"] if v["image"] == "torch2.11-cu130-py312")
    assert "driver 535.54.03 is older than CUDA 13.0 needs (580.65.06)" == reason


def test_v100_runs_without_flash_attn_and_not_on_cuda_12_8() -> None:
    report = check_gpu("V100-32GB", Catalog.load())
    verdicts = _verdicts(report)
    assert verdicts["torch2.3-cu121-py312"] == RUNS_WITHOUT_FLASH_ATTN
    assert verdicts["torch2.8-cu128-py312"] == DOES_NOT_RUN
    assert report["best"] in {s for s, v in verdicts.items() if v == RUNS_WITHOUT_FLASH_ATTN}


def test_unknown_gpu_and_bad_driver_are_user_errors() -> None:
    with pytest.raises(SameboxError, match="unknown GPU 'GTX 1080'"):
        check_gpu("GTX 1080", Catalog.load())
    with pytest.raises(SameboxError, match="not a version"):
        check_gpu("H20", Catalog.load(), driver="latest")


def test_flash_attn2_gpu_decision() -> None:
    from builder.instance.converge import flash_attn2_gpu

    assert flash_attn2_gpu(make_env(gpus=(("NVIDIA GeForce RTX 4090", "8.9"),)))
    assert not flash_attn2_gpu(make_env(gpus=(("Tesla V100-SXM2-32GB", "7.0"), ("Tesla T4", "7.5"))))
    assert flash_attn2_gpu(make_env(gpus=(("Tesla V100-SXM2-32GB", "7.0"), ("NVIDIA A100-SXM4-80GB", "8.0"))))
    unknown = make_env()
    unknown = replace(unknown, gpus=(Gpu("Some Future GPU"),))
    assert flash_attn2_gpu(unknown), "unknown cards go to the resolver, which decides"
    assert not flash_attn2_gpu(make_env()), "no GPU"
