"""builder/core/settings.py: one decision for every location; the wheel cache the same for setup and `samebox wheel`
on an AutoDL layout (data disk + region-shared disk), made here in temporary directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from builder.core import settings
from builder.instance import converge_steps as steps
from builder.instance.converge import parse_options
from builder.instance.converge_steps import Match, Preflight, Run
from builder.wheels.cache import default_cache_dir


@pytest.fixture
def autodl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    data, shared = tmp_path / "autodl-tmp", tmp_path / "autodl-fs"
    data.mkdir()
    shared.mkdir()
    monkeypatch.setattr(settings, "AUTODL_DATA_DISK", data)
    monkeypatch.setattr(settings, "AUTODL_SHARED_FS", shared)
    monkeypatch.setattr(settings, "AUTODL_TURBO", tmp_path / "network_turbo")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAMEBOX_WHEEL_CACHE", raising=False)
    return data, shared


def _run(tmp_path: Path, data: Path, shared: str) -> Run:
    match = Match(image="img", image_torch="2.5.1+cu124", provider="conda", flash_attn="2.8.3", torch="2.5.1+cu124",
                  gpus=("NVIDIA H100 80GB HBM3",), flash_attn2_gpu=True, describe="H100", data_disk=str(data),
                  shared_fs=shared)
    cache = settings.instance_cache(None, str(data), shared)
    opts = parse_options([], {"SAMEBOX_STATE": str(tmp_path / "state"), "HOME": str(tmp_path / "home")})
    pre = Preflight(match=match, root=None, catalog=tmp_path / "c.json", lock_source=tmp_path / "l",
                    lockfile=tmp_path / "lock.txt", cache_dir=cache, free_mb=10_000, needs_venv=False)
    return Run(opts=opts, pre=pre, work=tmp_path / "work", python=sys.executable)


def test_setup_and_samebox_wheel_share_the_region_cache_on_autodl(tmp_path: Path, autodl) -> None:
    data, shared = autodl
    run = _run(tmp_path, data, str(shared))
    with mock.patch.dict(os.environ):
        for name, _ in settings.KERNEL_CACHES:  # torch sets TORCHINDUCTOR_CACHE_DIR once inductor ran in this process
            os.environ.pop(name, None)
        steps.caches(run)
        exported = os.environ["SAMEBOX_WHEEL_CACHE"]
    region = shared / "samebox" / "wheels"
    assert run.wheel_cache == region and exported == str(region)
    assert f"export SAMEBOX_WHEEL_CACHE={region}" in (tmp_path / "state" / "env.sh").read_text()
    # the other caches stay on the instance's own data disk
    assert f"export HF_HOME={data / '.cache' / 'huggingface'}" in (tmp_path / "state" / "env.sh").read_text()
    # `samebox wheel` on this instance (env.sh sourced or not) and on a clone of the region find the same cache
    assert default_cache_dir({"SAMEBOX_WHEEL_CACHE": exported}) == region
    assert default_cache_dir({"HOME": str(tmp_path / "elsewhere")}) == region
    # the installed-file findings beside it: a clone's fingerprint re-reads only what changed there
    checks = shared / "samebox" / "file-checks.json"
    assert f"export SAMEBOX_FILE_CHECKS={checks}" in (tmp_path / "state" / "env.sh").read_text()
    assert checks.parent.is_dir()
    assert settings.file_checks({"SAMEBOX_FILE_CHECKS": str(checks)}) == checks
    assert settings.file_checks({"SAMEBOX_STATE": str(tmp_path / "s")}) == tmp_path / "s" / "file-checks.json"
    # a wheel cache the user chose holds it (never its parent, which may be ~); the user's own place wins
    assert settings.shared_file_checks(Path("/data/mywheels"), {}) == Path("/data/mywheels/file-checks.json")
    assert settings.shared_file_checks(region, {"SAMEBOX_FILE_CHECKS": "/x/f.json"}) == Path("/x/f.json")
    # the compiled-kernel caches beside it, made, and exported to every later shell
    text = (tmp_path / "state" / "env.sh").read_text()
    for name, sub in (("CUDA_CACHE_PATH", "cuda"), ("TRITON_CACHE_DIR", "triton"),
                      ("TORCHINDUCTOR_CACHE_DIR", "torchinductor")):
        assert f"export {name}={shared / 'samebox' / 'kernels' / sub}\n" in text
        assert (shared / "samebox" / "kernels" / sub).is_dir()
    assert settings.kernel_caches(Path("/data/mywheels"), {})["TRITON_CACHE_DIR"] == \
        Path("/data/mywheels/kernels/triton")
    # a cache the user points somewhere already is theirs: not exported
    assert "TRITON_CACHE_DIR" not in settings.kernel_caches(region, {"TRITON_CACHE_DIR": "/mine"})
    assert set(settings.kernel_caches(region, {"TRITON_CACHE_DIR": ""})) == {name for name, _ in settings.KERNEL_CACHES}


def test_a_cache_folder_that_cannot_be_made_is_said_and_left_out(tmp_path: Path, autodl, capsys) -> None:
    data, shared = autodl
    run = _run(tmp_path, data, str(shared))
    (shared / "samebox").mkdir(parents=True)
    (shared / "samebox" / "kernels").write_text("a file where the folder would go")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder would go")
    with mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": str(tmp_path / "mine"),
                                      "SAMEBOX_FILE_CHECKS": str(blocked / "findings" / "file-checks.json")}):
        for name in ("CUDA_CACHE_PATH", "TORCHINDUCTOR_CACHE_DIR"):  # torch sets the latter once inductor ran here
            os.environ.pop(name, None)
        steps.caches(run)
    text = (tmp_path / "state" / "env.sh").read_text()
    assert "CUDA_CACHE_PATH" not in text and "TRITON_CACHE_DIR" not in text and "TORCHINDUCTOR" not in text
    said = capsys.readouterr().out
    assert said.count("cannot be made") == 3  # CUDA's and TorchInductor's caches (Triton's is the user's), findings
    assert "file-check findings are not kept" in said
    assert "SAMEBOX_FILE_CHECKS" in text and "HF_HOME" in text  # the rest of the caches as before


def test_the_flash_attn_step_asks_the_resolver_for_that_cache(tmp_path: Path, autodl,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data, shared = autodl
    run = _run(tmp_path, data, str(shared))
    run.work.mkdir()
    with mock.patch.dict(os.environ):
        steps.caches(run)
    asked: list[tuple[str, ...]] = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(steps, "_drift", lambda *a, **k: type("R", (), {"returncode": 1})())

    def samebox(run_, *args, **kwargs):
        asked.append(args)
        raise Stop

    monkeypatch.setattr(steps, "_samebox", samebox)
    with pytest.raises(Stop):
        steps.flash_attn(run)
    args = asked[0]
    assert args[args.index("--cache") + 1] == str(shared / "samebox" / "wheels")


def test_without_a_shared_disk_the_wheels_stay_with_the_instance_caches(tmp_path: Path, autodl,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data, shared = autodl
    shared.rmdir()
    run = _run(tmp_path, data, "")
    with mock.patch.dict(os.environ):
        steps.caches(run)
    assert run.wheel_cache == data / ".cache" / "samebox" / "wheels"
    assert default_cache_dir({"HOME": str(tmp_path / "home")}) == tmp_path / "home" / ".cache" / "samebox" / "wheels"
    assert default_cache_dir({"SAMEBOX_WHEEL_CACHE": "/x/y"}) == Path("/x/y")


def test_every_location_has_one_reader() -> None:
    env = {"HOME": "/h", "SAMEBOX_STATE": "rel/state", "SAMEBOX_CACHE": "/c", "SAMEBOX_VENV": "/v",
           "SAMEBOX_MIN_FREE_MB": "", "SAMEBOX_PIN_MEMORY": "0"}
    assert settings.state_dir(env) == Path(os.path.abspath("rel/state"))
    assert settings.state_dir({"HOME": "/h"}) == Path("/h/.samebox")
    assert settings.tokenized_cache(env) == Path("/c/tokenized")
    assert settings.tokenized_cache({"HOME": "/h"}) == Path("/h/.cache/samebox/tokenized")
    assert settings.venv_dir(env) == Path("/v") and settings.venv_dir({}) == settings.DEFAULT_VENV
    assert settings.min_free_mb(env) == str(settings.DEFAULT_MIN_FREE_MB)  # empty means unset
    assert settings.pin_memory(env) is False and settings.pin_memory({}) is True
    assert settings.mlp_chunk_tokens({"SAMEBOX_MLP_CHUNK_TOKENS": "2048"}) == 2048
    assert settings.mlp_chunk_tokens({"SAMEBOX_MLP_CHUNK_TOKENS": "0"}) is None  # not a chunk: the default
    assert settings.mlp_chunk_tokens({"SAMEBOX_MLP_CHUNK_TOKENS": "lots"}) is None
    assert settings.mlp_chunk_tokens({}) is None
    assert settings.offload_in_flight({"SAMEBOX_OFFLOAD_IN_FLIGHT": "0"}) == 0  # 0 = no bound
    assert settings.offload_in_flight({"SAMEBOX_OFFLOAD_IN_FLIGHT": "x"}) is None
    assert settings.offload_in_flight({}) is None
    assert settings.instance_cache(None, "/root/autodl-tmp", "/root/autodl-fs") == Path("/root/autodl-tmp/.cache")
    assert settings.instance_cache(None, "", "", {"HOME": "/h"}) == Path("/h/.cache")
