"""Atomic, verifiable checkpoints: adapter, optimizer, scheduler, RNG states and data position in one directory per
step, with a manifest of every file's size and sha256.

A checkpoint is written into a hidden staging directory (every file through a Python file object, so a full disk is
an OSError with its errno, whatever library serializes), fsynced, its manifest written last, then renamed into
place; older ones are pruned only after that. A write that fails removes the staging directory and leaves every
earlier checkpoint as it was. A ``step-NNNNNNNN`` directory whose files do not match its manifest (truncated,
damaged, copied in part) is refused at resume (trainer/loop/rundir.py picks the newest one that passes).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from builder.core.errors import SameboxError
from builder.core.fsutil import readable_files, sha256_file

PREFIX = "step-"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``step-N`` directory, oldest first, whether or not it passes its checks (verify_checkpoint)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p.name) is not None]
    return sorted(found, key=lambda p: _step_of(p.name) or 0)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _write(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """One file of a checkpoint, written and fsynced through Python's file object: torch.save to a path would turn
    a full disk into a RuntimeError without an errno."""
    with open(path, "wb") as fh:
        fill(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or the one torch.save re-raises as a RuntimeError from a file object."""
    if isinstance(e, OSError):
        return e
    inner = e.__cause__ or e.__context__
    return inner if isinstance(e, RuntimeError) and isinstance(inner, OSError) else None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(path: Path) -> int | None:
    """A complete checkpoint's size, from its manifest (None without one)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return sum(f["bytes"] for f in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_failed(run_dir: Path, step: int, error: OSError, need: int | None, keep_last: int | None) -> SameboxError:
    """What a failed save tells the user: where, how much room a checkpoint needs, and what is kept."""
    where = checkpoint_dir(run_dir)
    found = list_checkpoints(run_dir)
    kept = f"the newest checkpoint, {found[-1].name}, is intact" if found else "no earlier checkpoint exists"
    lost = f"checkpoint {PREFIX}{step:08d} not saved (the unfinished copy is removed; {kept})"
    if error.errno not in DISK_FULL:
        return SameboxError(f"{lost}: cannot write {error.filename or where}: {error.strerror or error}",
                            hint="make output.dir writable again, then continue with --resume auto")
    free = shutil.disk_usage(where).free if where.is_dir() else 0
    takes = f"a checkpoint takes about {_size(need)}; " if need else ""
    room = f" (room for {_size(need * (keep_last + 1))}: output.keep_last={keep_last} checkpoints plus the one " \
        "being written)" if need and keep_last else ""
    return SameboxError(f"{lost}: no space left on the device of {where} ({takes}{_size(free)} free there now)",
                        hint=f"free space there{room} or lower output.keep_last, then continue with --resume auto")


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f".{PREFIX}{step:08d}.partial"


def _displaced(final: Path) -> Path:
    """Where a step's earlier copy waits while the same step is saved again."""
    return final.with_name(f".{final.name}.old")


def clear_staging(run_dir: Path, step: int) -> None:
    """Rank 0, before the ranks write: a staging dir left by a killed run (maybe of another world size) goes."""
    shutil.rmtree(staging_dir(run_dir, step), ignore_errors=True)


def tidy_staging(run_dir: Path) -> None:
    """Rank 0 at the start of a run, holding output.dir's lock (so no save is in flight): what a killed save left.
    Unfinished copies go; a step's earlier copy displaced by a save killed between its two renames is put back."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        name = path.name
        if name.startswith(f".{PREFIX}") and name.endswith(".partial"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(f".{PREFIX}") and name.endswith(".old"):
            final = root / name[1:-len(".old")]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)


def write_rank_rng(run_dir: Path, step: int, rank: int) -> None:
    """Every rank's RNG (LoRA dropout differs per rank); called on all ranks before rank 0 commits."""
    tmp = staging_dir(run_dir, step)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _write(tmp / f"rng-{rank}.pt", lambda fh: torch.save(rng_state(), fh))
    except Exception as e:
        if rank == 0:  # the staging directory is rank 0's: no unfinished copy stays (the others stop with it)
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(e)
        if cause is None:
            raise
        found = list_checkpoints(run_dir)
        raise _save_failed(run_dir, step, cause, checkpoint_bytes(found[-1]) if found else None, None) from None


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights by parameter name (what a sharded run gathers with trainer.loop.sharding.trainable_state)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _write_manifest(tmp: Path) -> None:
    """Last file of a checkpoint: every other file's size and sha256, read back from what was written."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(tmp.iterdir()) if f.name != MANIFEST}
    _write(tmp / MANIFEST, lambda fh: fh.write(json.dumps({"files": files}, indent=2, sort_keys=True).encode()))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the manifest names is there with its size and sha256; else what is wrong. Sizes first
    (a truncated file costs no hashing), then the hashes."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        listed = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish, or it was copied in part)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if STATE_FILE not in listed:
        return f"{MANIFEST} does not list {STATE_FILE}"
    for name, (size, _) in sorted(listed.items()):
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual:,} bytes, its manifest says {size:,} (truncated or overwritten)"
    for name, (_, digest) in sorted(listed.items()):
        try:
            if sha256_file(path / name) != digest:
                return f"{name} fails its sha256 check (the file is damaged)"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None


def commit_checkpoint(run_dir: Path, step: int, model: Any, trainable: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any], scheduler: Any, state: dict[str, Any], keep_last: int) -> Path:
    """Rank 0: write the rest into the staging directory, fsync, rename into place, prune old ones. ``trainable``
    and ``optimizer_state``: the whole LoRA weights and optimizer state (gathered first when sharded). A write that
    fails (a full disk) removes the staging directory and raises a SameboxError; no earlier checkpoint is touched."""
    from peft import get_peft_model_state_dict

    tmp = staging_dir(run_dir, step)
    adapter = {k: v.detach().contiguous().cpu()
               for k, v in get_peft_model_state_dict(model, state_dict=trainable).items()}
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _write(tmp / "adapter_model.safetensors", lambda fh: fh.write(safetensors_bytes(adapter)))
        model.peft_config["default"].save_pretrained(str(tmp))
        _write(tmp / "optimizer.pt", lambda fh: torch.save(optimizer_state, fh))
        _write(tmp / "scheduler.pt", lambda fh: torch.save(scheduler.state_dict(), fh))
        _write(tmp / STATE_FILE,
               lambda fh: fh.write(json.dumps(state, indent=2, sort_keys=True, default=str).encode()))
        readable_files(tmp)
        _fsync_tree(tmp)
        _write_manifest(tmp)
        _fsync_dir(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(e)
        if cause is None:
            raise
        found = list_checkpoints(run_dir)
        need = (checkpoint_bytes(found[-1]) if found else None) or _tensor_bytes([adapter, optimizer_state])
        raise _save_failed(run_dir, step, cause, need, keep_last) from None
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    # A step saved again (after a resume) keeps its old copy until the new one is in place: never a moment
    # without a complete checkpoint of this step (tidy_staging puts it back after a kill between the renames).
    previous = _displaced(final)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:  # a newer step left by an earlier timeline never pushes out the one just written
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state a checkpoint was saved with (step, data position, counters)."""
    return json.loads((path / STATE_FILE).read_text())


def load_adapter(path: Path, model: Any) -> None:
    """The checkpoint's LoRA weights into the whole (not yet sharded) adapter of ``model``."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise SameboxError(f"checkpoint {path} does not match the LoRA setup (unexpected {unexpected[:3]})",
                           hint="resume with the config the checkpoint was written with")


def load_optimizer_file(path: Path) -> dict[str, Any]:
    return torch.load(path / "optimizer.pt", weights_only=True)


def load_schedule_and_rng(path: Path, scheduler: Any, rank: int) -> None:
    """The scheduler and this rank's RNG (last: nothing after it draws from the RNG before training)."""
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
