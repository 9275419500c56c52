"""Environment checks: installed packages against the lockfile, /dev/shm, the data dir (space and a
write+fsync), and whether the Hugging Face cache sits on a small system disk."""

from __future__ import annotations

from typing import Any

from builder.core.settings import AUTODL_DATA_DISK, AUTODL_SHARED_FS
from builder.selftest.findings import Finding, fail, gib, na, ok, probe_error, warn
from builder.selftest.probes import DATA_DIR, HF_CACHE, LOCKFILE, SHM

SHM_WARN_BYTES = 2**30
DATA_FAIL_FREE, DATA_WARN_FREE = 5 * 2**30, 20 * 2**30
DATA_WARN_MBPS = 50.0
# AutoDL's system disk is 30 GB: a cache of a few 7B checkpoints fills it.
SMALL_SYSTEM_DISK = 64 * 2**30
HF_WARN_FREE = 20 * 2**30
SHOWN_PROBLEMS = 12


def _crash(reading: Any, what: str) -> Finding | None:
    err = probe_error(reading)
    return fail(f"the {what} probe crashed: {err}", "run `samebox selftest --json` for details") if err else None


def _shown(problems: list[str]) -> str:
    """The first SHOWN_PROBLEMS problems, and how many more there are."""
    more = len(problems) - SHOWN_PROBLEMS
    return "; ".join(problems[:SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def lockfile(r: dict[str, Any]) -> Finding:
    lock = r.get(LOCKFILE.name)
    early = _crash(lock, "lockfile")
    if early:
        return early
    if lock is None:
        return na("the lockfile probe did not run")
    if not lock.get("lockfile"):
        return na(
            f"no lockfile to compare with: {lock.get('chosen_by')}",
            "set SAMEBOX_LOCKFILE=lockfiles/<image>.txt to compare this environment with a lock",
        )
    if lock.get("missing") and not lock.get("claimed", True):
        return na(f"no lockfile {lock['lockfile']} to compare with ({lock['chosen_by']})")
    if lock.get("missing"):
        return warn(
            f"lockfile {lock['lockfile']} ({lock['chosen_by']}) does not exist",
            "generate it: make lock IMAGE=<id>, or set SAMEBOX_LOCKFILE to the lock this machine was set up from",
        )
    problems = lock.get("problems") or []
    if problems:
        text = f"{len(problems)} package(s) differ from {lock['lockfile']} ({lock['chosen_by']}): {_shown(problems)}"
        fix = (
            f"reinstall from the lock: pip install --no-deps --require-hashes -r {lock['lockfile']} "
            "(or re-run the setup script); a drifted torch means another platform image"
        )
        if lock.get("claimed", True):
            return fail(text, fix)
        return warn(
            text,
            "this environment does not claim a lock; set it up with samebox (setup script or image) "
            "to make it reproducible, or " + fix,
        )
    platform = lock.get("platform") or []
    if platform:
        return warn(
            f"the samebox packages match {lock['lockfile']}, but {len(platform)} library(ies) that come with the "
            f"platform's torch differ (kept as the platform ships them): {_shown(platform)}",
            "these come with the base image: rent the platform image the lock was made for "
            "(`samebox images`, the platforms column), or lock for this one",
        )
    files = ", files hashed against their RECORD" if lock.get("files_checked") else ""
    return ok(f"installed packages match {lock['lockfile']} ({lock['chosen_by']}{files})")


def shm(r: dict[str, Any]) -> Finding:
    reading = r.get(SHM.name)
    early = _crash(reading, "/dev/shm")
    if early:
        return early
    if reading is None:
        return na("no /dev/shm on this system")
    if reading["total_bytes"] < SHM_WARN_BYTES:
        return warn(
            f"/dev/shm is {gib(reading['total_bytes'])}: DataLoader workers die with 'bus error'",
            "docker run --shm-size=16g (or --ipc=host); or set the trainer's num_workers to 0",
        )
    return ok(f"/dev/shm {gib(reading['total_bytes'])} ({gib(reading['free_bytes'])} free)")


def data_dir(r: dict[str, Any]) -> Finding:
    d = r.get(DATA_DIR.name)
    early = _crash(d, "data dir")
    if early:
        return early
    if d is None:
        return na("no --data-dir given", f"pass --data-dir where checkpoints go (AutoDL: {AUTODL_DATA_DISK})")
    if d.get("not_a_directory"):
        return fail(
            f"data dir {d['path']} cannot be made: {d['not_a_directory']} is a file",
            "point --data-dir (samebox train: output.dir) at a directory on the data disk",
        )
    if d.get("exists", True) or "judged" not in d:
        where = f"data dir {d['path']}"
    else:  # samebox train makes output.dir; the disk it will be on is judged
        where = f"data dir {d['path']} (not made yet; judged on {d['judged']})"
    space = f"{gib(d['free_bytes'])} free of {gib(d['total_bytes'])}"
    if "write_error" in d:
        return fail(
            f"{where}: writing 16 MiB + fsync failed: {d['write_error']} ({space})",
            f"use a writable data disk with room for checkpoints (AutoDL: {AUTODL_DATA_DISK}); "
            "free space or remount read-write",
        )
    if d["free_bytes"] < DATA_FAIL_FREE:
        return fail(
            f"{where}: only {space}: checkpoints will not fit",
            "free space (old checkpoints, caches) or pass another --data-dir",
        )
    if d["free_bytes"] < DATA_WARN_FREE:
        return warn(f"{where}: {space}", "a 7B LoRA run writes several GiB of checkpoints: free space")
    if d["write_mbps"] < DATA_WARN_MBPS:
        return warn(
            f"{where}: {space}, but write+fsync runs at {d['write_mbps']:.0f} MB/s",
            f"network storage (e.g. AutoDL's {AUTODL_SHARED_FS}) is slow for checkpoints: use the local data disk",
        )
    return ok(f"{where}: {space}, write+fsync {d['write_mbps']:.0f} MB/s")


def hf_cache(r: dict[str, Any]) -> Finding:
    h = r.get(HF_CACHE.name)
    early = _crash(h, "HF cache")
    if early:
        return early
    if h is None:
        return na("the Hugging Face cache probe did not run")
    fs, root = h["fs"], h["root_fs"]
    where = f"Hugging Face cache {h['cache']}: {gib(fs['free_bytes'])} free of {gib(fs['total_bytes'])}"
    move = f"export HF_HOME=<data disk>/hf (AutoDL: {AUTODL_DATA_DISK}/hf) before downloading models"
    if fs["device"] == root["device"] and root["total_bytes"] < SMALL_SYSTEM_DISK:
        return warn(f"{where}, on the {gib(root['total_bytes'])} system disk", move)
    if fs["free_bytes"] < HF_WARN_FREE:
        return warn(f"{where}: too little for model downloads", move)
    return ok(where)
