"""A complete fake flash-attn world per test: toolchain on PATH, sdist and release wheels on a local HTTP host."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.core import compat
from builder.core.environment import Environment
from builder.wheels import build
from builder.wheels.cache import WheelCache
from builder.wheels.key import WheelKey
from tests.envs import make_env
from tests.wheels import fakes


@dataclass
class World:
    root: Path
    www: Path
    base: str
    sdist: Path
    cache: WheelCache
    facts: Environment
    key: WheelKey
    builds: Path  # one line per setup.py run: "<pid> <objects to compile>"

    def release_dir(self) -> Path:
        return self.www / "releases" / f"v{fakes.VERSION}"

    def requests(self) -> list[str]:
        log = self.root / "requests.log"
        return log.read_text().splitlines() if log.is_file() else []

    def build_runs(self) -> list[str]:
        return self.builds.read_text().splitlines() if self.builds.is_file() else []


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    cuda_home = fakes.make_toolchain(tmp_path / "cuda" / "bin")
    monkeypatch.setenv("CUDA_HOME", str(cuda_home))
    monkeypatch.setenv("PATH", f"{cuda_home / 'bin'}:/usr/bin:/bin")
    www = tmp_path / "www"
    sdist = fakes.make_sdist(www / "pypi")
    builds = tmp_path / "builds.log"
    monkeypatch.setenv("FAKE_BUILD_COUNT", str(builds))
    monkeypatch.setattr(build, "BUILD_MODULES", ("setuptools",))
    # A pip mirror (PIP_INDEX_URL) that serves the same sdist, found by its hash: downloads go through it.
    (www / "mirror").mkdir()
    (www / "mirror" / sdist.name).write_bytes(sdist.read_bytes())
    (www / "simple" / "flash-attn").mkdir(parents=True)
    (www / "simple" / "flash-attn" / "index.html").write_text(
        f'<a href="../../mirror/{sdist.name}#sha256={fakes.sha256(sdist)}">{sdist.name}</a>')
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    with fakes.http_server(www) as base:
        monkeypatch.setenv("PIP_INDEX_URL", f"{base}/simple")
        release = fakes.fake_release(fakes.sha256(sdist), f"{base}/pypi/{sdist.name}")
        monkeypatch.setitem(compat.FLASH_ATTN_RELEASES, fakes.VERSION, release)
        monkeypatch.setenv("SAMEBOX_FA_RELEASE_BASE", f"{base}/releases")
        facts = make_env("2.11.0+cu130", "13.0", fakes.PYDOT)
        key = WheelKey(fakes.VERSION, "2.11.0+cu130", "13.0", fakes.PY, True, ("9.0",), "full")
        yield World(tmp_path, www, base, sdist, WheelCache(tmp_path / "cache"), facts, key, builds)
