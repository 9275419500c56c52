"""The resolver: a WheelKey -> one verified wheel in the cache, trying the cache, then the official prebuilt
wheel, then a source build, and saying what each step did. Also the dry-run plan and the install step.

Order is cheapest first: a cache hit costs a sha256; a release download seconds; a build minutes to hours.
The key lock is taken before the slow steps, and the cache is looked up again once held, so a second process
for the same key waits for the first and then takes its wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.environment import Environment, sm_list
from builder.core.errors import SameboxError
from builder.wheels import build, release, verify
from builder.wheels.cache import CacheEntry, WheelCache, copy_atomic
from builder.wheels.key import WheelKey, release_facts

Say = Callable[[str], None]


@dataclass
class Resolution:
    key: WheelKey
    entry: CacheEntry
    source: str  # "cache" | "release" | "build"
    steps: list[str] = field(default_factory=list)
    seconds: float = 0.0
    numeric: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "key_id": self.key.id, "wheel": str(self.entry.path),
                "sha256": self.entry.sha256, "source": self.source, "elf_archs": list(self.entry.elf_archs),
                "steps": self.steps, "seconds": round(self.seconds, 2), "numeric": self.numeric}


def built_wheel_name(key: WheelKey) -> str:
    return f"flash_attn-{key.flash_attn}+{key.local_version}-{key.python}-{key.python}-linux_x86_64.whl"


def dry_run(key: WheelKey, cache: WheelCache, offline: bool, cores: int | None = None,
            ram_gb: float | None = None) -> dict[str, Any]:
    """Everything the resolver would try for ``key``, computed without downloading or building anything."""
    entry = cache.read_manifest()["entries"].get(key.id)
    rw = release.release_wheel(key)
    facts = release_facts(key.flash_attn)
    out: dict[str, Any] = {
        "key": key.to_dict(), "key_id": key.id, "cache": str(cache.root),
        "cache_path": str(cache.root / (entry["file"] if entry else built_wheel_name(key))),
        "cached": bool(entry and (cache.root / entry["file"]).is_file()),
        "release": {"name": rw.name, "url": None if offline else rw.url, "note": rw.reason
                    if not offline else "skipped: --offline"},
        "sdist": {"url": facts.sdist_url, "sha256": facts.sdist_sha256},
        "build_dir": str(cache.build_dir(key)),
    }
    try:
        plan = build.plan_build(key, cores or build.cpu_count(),
                                ram_gb if ram_gb is not None else build.free_ram_gb())
        out["build"] = plan.to_dict()
    except SameboxError as e:
        out["build"] = {"error": str(e)}
    return out


def _from_release(key: WheelKey, cache: WheelCache, steps: list[str], say: Say) -> CacheEntry | None:
    rw = release.release_wheel(key)
    if rw.url is None or rw.name is None:
        steps.append(f"release: no official wheel ({rw.reason})")
        say(steps[-1])
        return None
    say(f"release: trying {rw.url}")
    got = release.download(rw.url, rw.name, cache.root / "incoming")
    if got is None:
        steps.append(f"release: {rw.url} not found")
        say(steps[-1])
        return None
    try:
        cuobjdump = verify.find_cuobjdump()
        found = verify.verify_wheel(got, key, exact_archs=False, cuobjdump=cuobjdump)
        entry = cache.add(key, got, "release", found, {"url": rw.url})
    finally:
        got.unlink(missing_ok=True)
    archs = sm_list(found)
    steps.append(f"release: downloaded {rw.name}, tags match (cuobjdump: {archs})")
    say(steps[-1])
    return entry


def _from_source(key: WheelKey, cache: WheelCache, here: Environment, sdist: Path | None, offline: bool,
                 steps: list[str], say: Say, python: str) -> tuple[CacheEntry, dict[str, Any] | None]:
    problems = build.check_toolchain(key, here, dict(os.environ), python)
    if problems:
        raise SameboxError(f"cannot build flash-attn {key.flash_attn} here:", "fix these and run again", problems)
    nvcc = build.find_nvcc(dict(os.environ))
    cuobjdump = verify.find_cuobjdump() or (str(nvcc.parent / "cuobjdump")
                                            if nvcc and (nvcc.parent / "cuobjdump").is_file() else None)
    build_dir = cache.build_dir(key)
    build_dir.mkdir(parents=True, exist_ok=True)
    tarball = build.fetch_sdist(key.flash_attn, build_dir, sdist, offline, say)
    steps.append(f"build: sdist {tarball.name} sha256 matches PyPI")
    src = build.prepare_source(tarball, build_dir)
    plan = build.plan_build(key, build.cpu_count(), build.free_ram_gb(), dict(os.environ),
                            build.compiled_objects(src), python)
    wheel = build.run_build(plan, src, say)
    found = verify.verify_wheel(wheel, key, exact_archs=True, cuobjdump=cuobjdump)
    steps.append(f"build: {wheel.name}, cuobjdump lists exactly {sm_list(key.archs)}")
    say(steps[-1])
    numeric = None
    uncovered = verify.gpu_problems(found, here.gpus, key)
    if not here.gpus:
        steps.append("numeric check: skipped (no GPU visible)")
    elif uncovered:
        steps.append(f"numeric check: skipped ({uncovered[0].split(':')[0]})")
    else:
        numeric = verify.numeric_check(wheel, python)
        worst = max(numeric["rel_err"].values())
        steps.append(f"numeric check: varlen fwd+bwd vs SDPA, worst relative error {worst:.1e} "
                     f"<= {verify.AGREEMENT_REL_ERROR:.0e}")
    say(steps[-1])
    entry = cache.add(key, wheel, "build", found, {"build": plan.to_dict(), "numeric": numeric})
    return entry, numeric


def resolve_wheel(key: WheelKey, cache: WheelCache, here: Environment, offline: bool = False,
                  sdist: Path | None = None, say: Say = lambda _m: None, python: str = sys.executable) -> Resolution:
    """cache -> official prebuilt -> source build; the wheel ends up verified in ``cache``."""
    start = time.monotonic()
    steps: list[str] = []
    say(f"key {key.id}")
    entry = cache.lookup(key)
    if entry:
        steps.append(f"cache: hit {entry.path.name} (sha256 ok)")
        say(steps[-1])
        return Resolution(key, entry, "cache", steps, time.monotonic() - start)
    steps.append(f"cache: miss in {cache.root}")
    say(steps[-1])
    with cache.key_lock(key, on_wait=lambda: say("another samebox holds this key's lock; waiting for it")):
        entry = cache.lookup(key)
        if entry:
            steps.append(f"cache: hit {entry.path.name} after waiting for the other process")
            say(steps[-1])
            return Resolution(key, entry, "cache", steps, time.monotonic() - start)
        if offline:
            steps.append("release: skipped (--offline)")
            say(steps[-1])
        else:
            entry = _from_release(key, cache, steps, say)
            if entry:
                return Resolution(key, entry, "release", steps, time.monotonic() - start)
        entry, numeric = _from_source(key, cache, here, sdist, offline, steps, say, python)
        return Resolution(key, entry, "build", steps, time.monotonic() - start, numeric)


def copy_to(entry: CacheEntry, dest_dir: Path) -> Path:
    dest = dest_dir / entry.path.name
    copy_atomic(entry.path, dest)
    return dest


def install(entry: CacheEntry, key: WheelKey, here: Environment, python: str = sys.executable) -> list[str]:
    """pip-install the wheel into ``python`` after checking its SASS runs on every GPU here (not a crash later)."""
    archs = entry.elf_archs
    if not archs and here.gpus:
        cuobjdump = verify.find_cuobjdump()
        archs = verify.elf_archs(entry.path, cuobjdump) if cuobjdump else key.archs
    problems = verify.gpu_problems(archs, here.gpus, key)
    if problems:
        raise SameboxError(f"refusing to install {entry.path.name} on this machine:", "", problems)
    cmd = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(entry.path)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SameboxError(f"pip could not install {entry.path.name}", "see pip's output below",
                           res.stderr.strip().splitlines()[-6:])
    return [f"install: {entry.path.name} into {python}"]
