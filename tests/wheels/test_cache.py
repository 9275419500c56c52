"""The wheel cache: location, atomic add, sha256 refusal, one builder per key across processes, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from builder.wheels.cache import default_cache_dir
from tests.conftest import REPO
from tests.wheels import fakes


def test_default_cache_dir(tmp_path):
    autodl = tmp_path / "autodl-fs"
    home = {"HOME": "/home/u"}
    assert default_cache_dir(home, autodl) == Path("/home/u/.cache/samebox/wheels")
    autodl.mkdir()
    assert default_cache_dir(home, autodl) == autodl / "samebox" / "wheels"
    assert default_cache_dir({**home, "SAMEBOX_WHEEL_CACHE": "/x"}, autodl) == Path("/x")


def test_add_is_atomic_and_usable_as_find_links(world, tmp_path):
    wheel = fakes.make_wheel(tmp_path / "in" / "flash_attn-9.9.9-cp312-cp312-linux_x86_64.whl")
    entry = world.cache.add(world.key, wheel, "build", ("9.0",))
    assert entry.path.parent == world.cache.root and entry.path.read_bytes() == wheel.read_bytes()
    assert sorted(p.name for p in world.cache.root.iterdir()) == ["flash_attn-9.9.9-cp312-cp312-linux_x86_64.whl",
                                                                  "locks", "manifest.json"]
    manifest = json.loads(world.cache.manifest_path.read_text())
    assert manifest["entries"][world.key.id]["key"] == world.key.to_dict()
    assert world.cache.lookup(world.key).sha256 == fakes.sha256(wheel)


def test_tampered_wheel_is_refused_and_reported(world, tmp_path):
    wheel = fakes.make_wheel(tmp_path / "flash_attn-9.9.9-cp312-cp312-linux_x86_64.whl")
    entry = world.cache.add(world.key, wheel, "build", ("9.0",))
    with open(entry.path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(SameboxError, match="does not match the manifest") as e:
        world.cache.lookup(world.key)
    assert f"rm {entry.path}" in str(e.value)


def test_manifest_written_by_something_else(world):
    world.cache.root.mkdir(parents=True)
    world.cache.manifest_path.write_text("{half")
    with pytest.raises(SameboxError, match="not valid JSON"):
        world.cache.lookup(world.key)


def _runner(world, cache: Path, **env: str) -> subprocess.Popen:
    full = {**os.environ, "FAKE_SDIST_SHA": fakes.sha256(world.sdist),
            "FAKE_SDIST_URL": f"{world.base}/pypi/{world.sdist.name}", "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", "tests.wheels.runner", str(cache)], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_one_key_build_once(world, tmp_path):
    cache = tmp_path / "shared"
    procs = [_runner(world, cache, FAKE_OBJECT_SECONDS="0.6") for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o) for o, _ in outs]
    assert sorted(r["source"] for r in results) == ["build", "cache"]
    assert results[0]["wheel"] == results[1]["wheel"] and results[0]["sha256"] == results[1]["sha256"]
    assert len(world.build_runs()) == 1
    waited = next(err for (_, err), r in zip(outs, results, strict=True) if r["source"] == "cache")
    assert "waiting for it" in waited
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_killed_build_resumes_from_kept_objects(world, tmp_path):
    cache = tmp_path / "c"
    proc = _runner(world, cache, FAKE_OBJECT_SECONDS="0.6")
    deadline = time.monotonic() + 30
    while not list(cache.glob("build/*/src/*/build/temp.fake/obj0.o")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "objects kept" in err
    time.sleep(0.8)  # the fake setup.py would have finished its next object by now if it had survived
    kept = list(cache.glob("build/*/src/*/build/temp.fake/*.o"))
    assert 1 <= len(kept) < 3
    again = _runner(world, cache)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert f"resuming: {len(kept)} of 3 objects already compiled" in err
    assert world.build_runs()[-1].split()[1] == str(3 - len(kept))
