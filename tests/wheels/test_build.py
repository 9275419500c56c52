"""Source-build settings (MAX_JOBS, profiles, ETA), toolchain checks, sdist hash checks, progress and resume."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import replace

import pytest

from builder.core import compat
from builder.core.errors import SameboxError
from builder.wheels import build
from builder.wheels.key import WheelKey
from tests.envs import make_env
from tests.wheels import fakes

KEY = WheelKey("2.8.3", "2.11.0+cu130", "13.0", "cp312", True, ("9.0",), "slim")
DEFINES = ("-DFLASHATTENTION_DISABLE_DROPOUT -DFLASHATTENTION_DISABLE_ALIBI "
           "-DFLASHATTENTION_DISABLE_SOFTCAP -DFLASHATTENTION_DISABLE_LOCAL")


@pytest.mark.parametrize("cores, ram, threads, jobs", [
    (16, 125.0, 1, 16), (16, 20.0, 1, 5), (2, 24.0, 1, 2), (16, 125.0, 4, 4), (64, 30.0, 2, 3), (8, 4.0, 1, 1),
])
def test_job_count(cores, ram, threads, jobs):
    assert build.job_count(cores, ram, threads) == jobs


def test_too_little_ram_for_one_job():
    with pytest.raises(SameboxError, match="too little free RAM.*3.5 GB free, one job needs ~4 GB"):
        build.job_count(16, 3.5, 1)


def test_slim_plan_env():
    plan = build.plan_build(KEY, 16, 125.0, {"CPPFLAGS": "-I/opt/x"}, python="/py")
    assert plan.env == {
        "FLASH_ATTENTION_FORCE_BUILD": "TRUE", "FLASH_ATTN_CUDA_ARCHS": "90",
        "FLASH_ATTN_LOCAL_VERSION": "cu130torch2.11cxx11abitrue.sm90.slim", "MAX_JOBS": "16", "NVCC_THREADS": "1",
        "CPPFLAGS": "-I/opt/x " + DEFINES, "NVCC_APPEND_FLAGS": DEFINES,
    }
    assert plan.command == ("/py", "setup.py", "bdist_wheel", "--dist-dir", "dist")
    assert 480 <= plan.eta_s <= 560  # measured: 529 s (519 s compiling, bench/results/flash_attn_build.json)


def test_full_plan_several_archs():
    key = replace(KEY, archs=("8.0", "9.0", "12.0"), profile="full")
    plan = build.plan_build(key, 16, 125.0, {})
    assert "CPPFLAGS" not in plan.env and "NVCC_APPEND_FLAGS" not in plan.env
    assert (plan.env["FLASH_ATTN_CUDA_ARCHS"], plan.nvcc_threads, plan.jobs) == ("80;90;120", 3, 5)
    assert plan.eta_s > build.plan_build(replace(key, profile="slim"), 16, 125.0, {}).eta_s


def test_lean_plan_adds_the_uneven_k_switch_and_is_quicker():
    lean = build.plan_build(replace(KEY, profile="lean"), 16, 125.0, {})
    assert lean.env["NVCC_APPEND_FLAGS"] == DEFINES + " -DFLASHATTENTION_DISABLE_UNEVEN_K"
    assert lean.env["FLASH_ATTN_LOCAL_VERSION"].endswith(".sm90.lean")
    assert lean.eta_s < build.plan_build(KEY, 16, 125.0, {}).eta_s


def test_resume_shortens_eta_and_says_so():
    fresh, resumed = build.plan_build(KEY, 16, 125.0, {}), build.plan_build(KEY, 16, 125.0, {}, done_objects=60)
    assert resumed.eta_s < fresh.eta_s and resumed.notes == ("resuming: 60 of 73 objects already compiled",)
    last = build.plan_build(KEY, 16, 125.0, {}, done_objects=72)
    assert last.eta_s == compat.FLASH_ATTN_OBJECT_SECONDS["slim"]  # one object left still takes one object's time
    assert build.plan_build(KEY, 16, 125.0, {}, done_objects=73).eta_s == 0


def test_release_without_arch_switch_cannot_target():
    with pytest.raises(SameboxError, match="always builds 8.0 \\+ 9.0") as e:
        build.plan_build(replace(KEY, flash_attn="2.6.3", torch="2.3.0+cu121", cuda="12.1"), 16, 64.0, {})
    assert "2.7.4.post1" in str(e.value)


def _problems(world, monkeypatch, nvcc_release="13.0", key=None, facts=None, **env):
    fakes.make_toolchain(world.root / "cuda" / "bin", nvcc_release)
    return build.check_toolchain(key or world.key, facts or world.facts, {"PATH": "/usr/bin:/bin", **env})


def test_toolchain_ok(world, monkeypatch):
    assert _problems(world, monkeypatch, CUDA_HOME=str(world.root / "cuda")) == []


def test_nvcc_missing(world, monkeypatch):
    monkeypatch.setattr(build, "CUDA_DEFAULT", world.root / "no-cuda")
    (problem,) = [p for p in _problems(world, monkeypatch) if "nvcc" in p]
    assert "nvcc not found" in problem and "cuda-nvcc-13-0" in problem


def test_nvcc_major_differs_from_torch(world, monkeypatch):
    problems = _problems(world, monkeypatch, "12.4", CUDA_HOME=str(world.root / "cuda"))
    assert any("is CUDA 12.4 but torch is built for CUDA 13.0: install the CUDA 13.0 toolkit" in p
               for p in problems)


def test_new_arch_needs_new_nvcc_and_env_must_match(world, monkeypatch):
    key = replace(world.key, archs=("12.0",), cuda="12.4", torch="2.5.1+cu124")
    facts = make_env("2.5.1+cu124", "12.4", world.facts.python, cxx11abi=False)
    problems = _problems(world, monkeypatch, "12.4", key, facts, CUDA_HOME=str(world.root / "cuda"))
    assert any("sm_120 needs nvcc >= 12.8" in p for p in problems)
    assert any("wants cxx11abi True but this Python" in p for p in problems)


def test_sdist_given_with_wrong_hash_is_refused(world, tmp_path):
    bad = tmp_path / "flash_attn-9.9.9.tar.gz"
    bad.write_bytes(world.sdist.read_bytes() + b"\0")
    with pytest.raises(SameboxError, match="PyPI publishes") as e:
        build.fetch_sdist(fakes.VERSION, tmp_path / "b", bad, offline=True, say=print)
    assert "refusing to build it" in str(e.value)
    assert list((tmp_path / "b").iterdir()) == []


def test_sdist_download_checked(world, tmp_path, monkeypatch):
    got = build.fetch_sdist(fakes.VERSION, tmp_path / "b", None, offline=False, say=print)
    assert got.read_bytes() == world.sdist.read_bytes()
    assert any(f"/mirror/{world.sdist.name}" in r for r in world.requests()), "fetched through PIP_INDEX_URL"
    release = compat.FLASH_ATTN_RELEASES[fakes.VERSION]
    monkeypatch.setitem(compat.FLASH_ATTN_RELEASES, fakes.VERSION, replace(release, sdist_sha256="0" * 64))
    with pytest.raises(SameboxError, match="has sha256"):
        build.fetch_sdist(fakes.VERSION, tmp_path / "c", None, offline=False, say=print)
    with pytest.raises(SameboxError, match="--offline and no sdist"):
        build.fetch_sdist(fakes.VERSION, tmp_path / "d", None, offline=True, say=print)


def test_run_build_reports_progress_and_passes_env(world, tmp_path):
    src = build.prepare_source(world.sdist, tmp_path / "b")
    plan = build.plan_build(replace(world.key, profile="slim"), 4, 64.0, {})
    said: list[str] = []
    wheel = build.run_build(plan, src, said.append)
    assert said[0].startswith(f"building {world.key.id[:20]}") and "ETA ~" in said[0]
    assert [s.split(",")[0] for s in said[1:4]] == [f"compiled {i}/3 objects" for i in (1, 2, 3)]
    # 3 objects on 4 jobs: all in the first wave, where the plan's ETA (135 s) counts down instead of the rate
    assert re.search(r"~2m1[345]s left$", said[1]), said[1]
    with zipfile.ZipFile(wheel) as zf:
        env = json.loads(zf.read("flash_attn/build_env.json"))
    assert env["NVCC_APPEND_FLAGS"] == DEFINES and env["MAX_JOBS"] == "4"
    assert build.compiled_objects(src) == 3


def test_live_eta_counts_the_plan_down_for_two_waves_then_follows_the_rate(world, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_OBJECTS", "9")
    src = build.prepare_source(world.sdist, tmp_path / "b")
    plan = replace(build.plan_build(world.key, 4, 64.0, {}), objects=9, eta_s=3600.0)
    said: list[str] = []
    build.run_build(plan, src, said.append)
    left = [line.rsplit("~", 1)[1] for line in said if line.startswith("compiled ")]
    assert len(left) == 9
    assert all(x.startswith("59m") or x.startswith("60m") for x in left[:7])  # waves 1-2: the plan's hour
    assert all(x.startswith("0m0") for x in left[7:])  # objects 8 and 9: the rate of a fast (fake) build


def test_failed_build_says_how_to_resume(world, tmp_path, monkeypatch):
    src = build.prepare_source(world.sdist, tmp_path / "b")
    monkeypatch.setenv("FAKE_FAIL_AFTER", "1")
    with pytest.raises(SameboxError, match="exit 137") as e:
        build.run_build(build.plan_build(world.key, 4, 64.0, {}), src, print)
    assert "nvcc: killed" in str(e.value) and "again to resume" in str(e.value)
    assert build.compiled_objects(src) == 1
    assert build.prepare_source(world.sdist, tmp_path / "b") == src  # unpacked once, ninja state kept


def test_free_ram_capped_by_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 263000000 kB\nMemAvailable: 251658240 kB\n")  # the host: 240 GiB free
    cg = tmp_path / "cg"
    assert round(build.free_ram_gb(meminfo, cg)) == 240
    cg.mkdir()
    (cg / "memory.max").write_text(str(32 * 2**30))
    (cg / "memory.current").write_text(str(2 * 2**30))
    assert round(build.free_ram_gb(meminfo, cg)) == 30
    (cg / "memory.max").write_text("max\n")
    assert round(build.free_ram_gb(meminfo, cg)) == 240


def test_cpu_count_capped_by_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert build.cpu_count(tmp_path) == min(4, build.cpu_count(tmp_path / "none"))
