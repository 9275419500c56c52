"""Live probes of the environment -> readings: installed packages against the lockfile, /dev/shm, the data
dir (free space, a write+fsync), and where the Hugging Face cache lives."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from builder.core.errors import SameboxError


def verify_lock(lockfile: Path, check_files: bool) -> tuple[list[str], list[str]]:
    """builder.instance.drift's comparison of the live environment with the lockfile, as (drift, platform libraries that
    differ) (imported here, on use: it hashes installed files against their RECORD when ``check_files``)."""
    from builder.instance.drift import split_lock_problems

    return split_lock_problems(lockfile, check_files=check_files)


def find_lockfile(explicit: str | None, torch_version: str | None) -> tuple[Path | None, str, bool]:
    """(lockfile or None, how it was chosen, whether this environment claims it): ``Catalog.claimed_lockfile``
    for this interpreter with the torch the identity probe found."""
    from builder.core.catalog import Catalog
    from builder.core.environment import Environment, TorchBuild

    env = replace(Environment.probe(torch=False, gpus=False),
                  torch=TorchBuild(version=torch_version) if torch_version else None)
    try:
        catalog = Catalog.load_for_claim(None, explicit)
    except SameboxError as e:
        return None, f"catalog: {e.message}", False
    try:
        claim = catalog.claimed_lockfile(env, explicit)
    except SameboxError as e:
        return None, f"catalog: {e.message}", False
    return claim.path, claim.how, claim.claimed


def lockfile_reading(explicit: str | None, torch_version: str | None, check_files: bool = False) -> dict[str, Any]:
    path, how, claimed = find_lockfile(explicit, torch_version)
    reading: dict[str, Any] = {"lockfile": str(path) if path else None, "chosen_by": how, "claimed": claimed}
    if path is None:
        return reading
    if not path.is_file():
        reading["missing"] = True
        return reading
    reading["problems"], reading["platform"] = verify_lock(path, check_files)
    reading["files_checked"] = check_files
    return reading


def disk(path: str) -> dict[str, Any]:
    st = os.statvfs(path)
    return {
        "path": path,
        "total_bytes": st.f_blocks * st.f_frsize,
        "free_bytes": st.f_bavail * st.f_frsize,
        "device": os.stat(path).st_dev,
    }


def shm() -> dict[str, Any] | None:
    return disk("/dev/shm") if os.path.isdir("/dev/shm") else None


def nearest_existing(path: str) -> str:
    """``path`` itself when it exists, else its nearest ancestor that does ('/' at worst)."""
    current = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


def data_dir(path: str | None, write_mib: int = 16) -> dict[str, Any] | None:
    """Free space, and a write+fsync of ``write_mib`` MiB (removed afterwards) with its speed. A directory not made
    yet (``samebox train`` makes output.dir) is judged on its nearest existing parent: the disk it will be on."""
    if path is None:
        return None
    judged = nearest_existing(path)
    reading: dict[str, Any] = {"path": path, "exists": os.path.isdir(path), "judged": judged}
    if not os.path.isdir(judged):
        reading["not_a_directory"] = judged  # the path runs through a file: it can never be made
        return reading
    reading.update({**disk(judged), "path": path})
    probe = Path(judged) / f".samebox-selftest-{os.getpid()}"
    start = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            block = os.urandom(2**20)
            for _ in range(write_mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        reading["write_mbps"] = write_mib * 2**20 / (time.perf_counter() - start) / 1e6
    except OSError as e:
        reading["write_error"] = f"{e.strerror or e} ({e.__class__.__name__}, errno {e.errno})"
    finally:
        with contextlib.suppress(OSError):  # nothing was created on a read-only or full filesystem
            probe.unlink(missing_ok=True)
    return reading


def hf_cache() -> dict[str, Any]:
    """Where the Hugging Face hub cache resolves to, and the filesystem under it compared with '/'."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    existing = cache
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "/"
    return {"cache": cache, "fs": disk(existing), "root_fs": disk("/")}
