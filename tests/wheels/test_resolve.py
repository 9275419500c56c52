"""Resolver order against a local release host: cache -> official wheel -> source build, each step reported."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from builder.cli import main
from builder.core.errors import SameboxError
from builder.wheels import release, verify
from builder.wheels.resolve import install, resolve_wheel
from tests.envs import make_env
from tests.wheels import fakes


def _publish(world, archs: str = "80;90", py: str = fakes.PY):
    name = release.release_wheel(world.key).name
    return fakes.make_wheel(world.release_dir() / name, archs, py)


def test_release_then_cache(world):
    _publish(world)
    said: list[str] = []
    first = resolve_wheel(world.key, world.cache, world.facts, say=said.append)
    assert first.source == "release"
    assert first.steps[0].startswith("cache: miss")
    assert "tags match (cuobjdump: sm_80, sm_90)" in first.steps[-1]
    assert first.entry.elf_archs == ("8.0", "9.0")
    assert world.build_runs() == []
    assert not list((world.cache.root / "incoming").iterdir())
    second = resolve_wheel(world.key, world.cache, world.facts)
    assert second.source == "cache" and second.entry.path == first.entry.path
    assert len([r for r in world.requests() if r.endswith(".whl")]) == 1


def test_missing_release_falls_back_to_build(world):
    result = resolve_wheel(world.key, world.cache, world.facts)
    assert result.source == "build"
    assert [s.split(":")[0] for s in result.steps] == ["cache", "release", "build", "build", "numeric check"]
    assert "not found" in result.steps[1]
    local = "cu130torch2.11cxx11abitrue.sm90.full"
    assert result.entry.path.name == f"flash_attn-9.9.9+{local}-{fakes.PY}-{fakes.PY}-linux_x86_64.whl"
    assert result.entry.elf_archs == ("9.0",)
    assert len(world.build_runs()) == 1
    manifest = json.loads(world.cache.manifest_path.read_text())
    assert manifest["entries"][world.key.id]["build"]["MAX_JOBS"] >= 1


def test_a_wheel_whose_gpu_code_cannot_be_checked_is_not_cached(world, monkeypatch):
    monkeypatch.setattr(verify, "find_cuobjdump", lambda env=None: None)
    (world.root / "cuda" / "bin" / "cuobjdump").unlink()
    with pytest.raises(SameboxError, match="not added to the cache") as e:
        resolve_wheel(world.key, world.cache, world.facts)
    assert any("cuobjdump not found" in p for p in e.value.problems)
    assert world.cache.lookup(world.key) is None


def test_offline_skips_release_and_slim_never_asks_for_it(world):
    _publish(world)
    result = resolve_wheel(world.key, world.cache, world.facts, offline=True, sdist=world.sdist)
    assert result.steps[1] == "release: skipped (--offline)" and result.source == "build"
    slim = replace(world.key, profile="slim")
    result = resolve_wheel(slim, world.cache, world.facts)
    assert "official wheels are the full profile" in result.steps[1]
    # Only the sdist was fetched (found by its hash on the PIP_INDEX_URL mirror): no release wheel was asked for.
    assert world.requests() == ["/simple/flash-attn/", f"/mirror/{world.sdist.name}"]


def test_release_with_wrong_tags_inside_is_refused(world):
    _publish(world, py="cp30")
    with pytest.raises(SameboxError, match="WHEEL tags") as e:
        resolve_wheel(world.key, world.cache, world.facts)
    assert "not added to the cache" in str(e.value)
    assert world.cache.lookup(world.key) is None


def test_release_without_the_keys_arch_is_refused(world):
    _publish(world, archs="80")
    with pytest.raises(SameboxError, match="the key wants at least sm_90"):
        resolve_wheel(world.key, world.cache, world.facts)


def test_sm80_wheel_refused_on_sm90_before_import(world):
    key80 = replace(world.key, archs=("8.0",), profile="slim")
    entry = resolve_wheel(key80, world.cache, world.facts).entry
    facts = replace(world.facts, gpus=make_env(gpus=(("NVIDIA H100 80GB HBM3", "9.0"),)).gpus)
    with pytest.raises(SameboxError) as e:
        install(entry, key80, facts, python="/nonexistent/python")
    text = str(e.value)
    assert "H100" in text and "sm_90" in text and "only has sm_80" in text
    assert "samebox wheel flash-attn --from-env --arch 9.0 --profile slim" in text


def test_dry_run_json_prints_plan_and_does_nothing(world, tmp_path, capsys):
    cache = tmp_path / "never"
    rc = main(["wheel", "flash-attn", "--image", "torch2.3-cu121-py312", "--dry-run", "--json",
               "--cache", str(cache)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and not cache.exists()
    assert out["key"]["archs"] == ["8.0", "9.0"] and out["key"]["cxx11abi"] is False
    assert out["release"]["url"].endswith(
        "/v2.7.4.post1/flash_attn-2.7.4.post1%2Bcu12torch2.3cxx11abiFALSE-cp312-cp312-linux_x86_64.whl")
    assert out["release"]["url"].startswith(world.base)
    assert out["build"]["env"]["FLASH_ATTN_CUDA_ARCHS"] == "80;90"
    assert out["cache_path"].startswith(str(cache)) and out["cached"] is False
    assert world.requests() == []


@pytest.mark.parametrize("argv, message", [
    (["--from-env"], "CPU build"),
    (["--image", "torch2.3-cu121-py312", "--arch", "7.5"], "flash-attn 2 needs Ampere or newer"),
    (["--image", "nope"], "no catalog image"),
    (["--image", "torch2.3-cu121-py312", "--version", "1.0"], "not in builder/core/compat.py"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert main(["wheel", "flash-attn", *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
