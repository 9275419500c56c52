"""Atomic checkpoints: adapter, optimizer, scheduler, RNG states and data position in one directory per step.

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed into place: a directory
named ``step-NNNNNNNN`` is always complete, so ``--resume auto`` can trust the newest one. The last K are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from builder.core.errors import SameboxError
from builder.core.fsutil import ensure_writable_dir, readable_files

PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f".{PREFIX}{step:08d}.partial"


def clear_staging(run_dir: Path, step: int) -> None:
    """Rank 0, before the ranks write: a staging dir left by a killed run (maybe of another world size) goes."""
    shutil.rmtree(staging_dir(run_dir, step), ignore_errors=True)


def write_rank_rng(run_dir: Path, step: int, rank: int) -> None:
    """Every rank's RNG (LoRA dropout differs per rank); called on all ranks before rank 0 commits."""
    tmp = staging_dir(run_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights by parameter name (what a sharded run gathers with trainer.loop.sharding.trainable_state)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def commit_checkpoint(run_dir: Path, step: int, model: Any, trainable: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any], scheduler: Any, state: dict[str, Any], keep_last: int) -> Path:
    """Rank 0: write the rest into the staging directory, fsync, rename into place, prune old ones. ``trainable``
    and ``optimizer_state``: the whole LoRA weights and optimizer state (gathered first when sharded)."""
    from peft import get_peft_model_state_dict

    tmp = staging_dir(run_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().contiguous().cpu()
               for k, v in get_peft_model_state_dict(model, state_dict=trainable).items()}
    save_file(adapter, str(tmp / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(tmp))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    readable_files(tmp)
    _fsync_tree(tmp)
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    # A step saved again (after a resume) keeps its old copy until the new one is in place: never a moment
    # without a complete checkpoint of this step.
    previous = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# What a finished or interrupted run leaves in output.dir besides metrics.jsonl (which the logger truncates to
# the step a run starts from) and TensorBoard's events (hidden from that step on by the writer's purge_step).
RUN_OUTPUTS = ("checkpoints", "adapter", "summary.json")


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """The output directory rule, applied before anything slow: output.dir is created (parents included) and must
    take a file; a run that would start over where checkpoints exist must say so (two runs' checkpoints and
    metrics never mix, and ``--resume auto`` never picks another run's step)."""
    if overwrite and resume:
        raise SameboxError(f"--overwrite starts over and --resume {resume} continues: pass one of them")
    ensure_writable_dir(run_dir, "output.dir")
    found = list_checkpoints(run_dir)
    if found and not resume and not overwrite:
        raise SameboxError(
            f"output.dir {run_dir} holds checkpoints of an earlier run (newest: {found[-1].name}); not starting over "
            "on top of them",
            hint=f"continue it with --resume auto, start a new run with another output.dir, or pass --overwrite to "
                 f"delete {', '.join(RUN_OUTPUTS)} there and start over")


def clear_run(run_dir: Path) -> None:
    """--overwrite: the earlier run's checkpoints, adapter and summary go (rank 0, once)."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """--resume auto -> newest complete checkpoint of this run (or None: fresh start); PATH -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise SameboxError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE})",
                           hint=f"use --resume auto, or a directory under {checkpoint_dir(run_dir)}")
    return path


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
