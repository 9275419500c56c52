"""The output directory a run owns, settled before the data is tokenized or a weight loads (cheapest check first):
one run at a time (trainer/loop/runlock.py), never a start over on an earlier run's checkpoints, and a resume only
from a checkpoint that passes its manifest's checks and was trained on the same data in the same order.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import SameboxError
from builder.core.fsutil import ensure_writable_dir, sha256_file
from trainer.config import TrainConfig
from trainer.loop import checkpoint as ckpt
from trainer.loop.distributed import Ranks
from trainer.loop.runlock import RunLock, lock_run_dir

# What a finished or interrupted run leaves in output.dir besides metrics.jsonl (which the logger truncates to
# the step a run starts from) and TensorBoard's events (hidden from that step on by the writer's purge_step).
RUN_OUTPUTS = ("checkpoints", "adapter", "summary.json")
CHANGED_DATA_FLAG = "--resume-changed-data"


@dataclass
class RunStart:
    """What open_run settled: the lock (rank 0), the checkpoint to resume from and its state, the data file's
    sha256 (recorded in every checkpoint), and whether the run resumes on changed data by the user's leave."""

    run_dir: Path
    lock: RunLock | None
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    data_sha256: str | None = None
    changed_data: bool = False

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunStart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _warn(message: str) -> None:
    print(f"samebox: warning: {message}", file=sys.stderr, flush=True)


def open_run(cfg: TrainConfig, resume: str | None, overwrite: bool, resume_changed_data: bool,
             ranks: Ranks) -> RunStart:
    """The output directory rule, in order: the flags agree; output.dir is created and takes a file; rank 0 holds
    its lock (before anything there is read or deleted); a killed save's leftovers are tidied; a run that would
    start over where checkpoints exist must say so; a resume finds a checkpoint that passes its checks, of the
    same data. Each rank calls it (each needs the checkpoint); only rank 0 locks, tidies and warns."""
    if overwrite and resume:
        raise SameboxError(f"--overwrite starts over and --resume {resume} continues: pass one of them")
    if resume_changed_data and not resume:
        raise SameboxError(f"{CHANGED_DATA_FLAG} applies to a resumed run", hint="add --resume auto (or PATH)")
    run_dir = ensure_writable_dir(Path(cfg.output.dir), "output.dir")
    start = RunStart(run_dir, lock_run_dir(run_dir) if ranks.main else None)
    try:
        if ranks.main:
            ckpt.tidy_staging(run_dir)
        _refuse_starting_over(run_dir, resume, overwrite)
        data_path = Path(cfg.data.path).expanduser()
        start.data_sha256 = sha256_file(data_path) if data_path.is_file() else None  # missing: prepare_data says so
        start.checkpoint = choose_checkpoint(run_dir, resume, ranks.main)
        if start.checkpoint is not None:
            start.state = ckpt.read_state(start.checkpoint)
            start.changed_data = _check_same_data(start, cfg, data_path, resume_changed_data, ranks.main)
    except BaseException:
        start.release()
        raise
    return start


def _refuse_starting_over(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Two runs' checkpoints and metrics never mix, and ``--resume auto`` never picks another run's step."""
    found = ckpt.list_checkpoints(run_dir)
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


def choose_checkpoint(run_dir: Path, resume: str | None, main: bool) -> Path | None:
    """--resume auto -> the newest checkpoint that passes its checks (None: no checkpoint, a fresh start); newer
    ones that fail are set aside as ``.step-N.damaged`` (by rank 0) and named. PATH -> that checkpoint, if it
    passes."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not (path / ckpt.STATE_FILE).is_file() and not (path / ckpt.MANIFEST).is_file():
            raise SameboxError(f"--resume {resume}: not a checkpoint directory (no {ckpt.STATE_FILE})",
                               hint=f"use --resume auto, or a directory under {ckpt.checkpoint_dir(run_dir)}")
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise SameboxError(f"--resume {resume}: the checkpoint fails its checks: {problem}",
                               hint="resume from another checkpoint (--resume auto takes the newest that passes)")
        return path
    found = ckpt.list_checkpoints(run_dir)
    failed: list[tuple[Path, str]] = []
    for path in reversed(found):
        problem = ckpt.verify_checkpoint(path)
        if problem is None:
            break
        failed.append((path, problem))
    else:
        if failed:
            raise SameboxError(
                f"--resume auto: none of the {len(found)} checkpoints in {ckpt.checkpoint_dir(run_dir)} passes its "
                "checks; nothing to resume from", problems=[f"{p.name}: {why}" for p, why in failed],
                hint="put a good copy of one back there, or start over with --overwrite (deletes them) or in "
                     "another output.dir")
        return None
    if main:
        for bad, why in failed:
            aside = bad.with_name(f".{bad.name}.damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            _warn(f"checkpoint {bad.name} fails its checks ({why}): skipped, kept as {aside}")
        if failed:
            _warn(f"resuming from {path}, the newest checkpoint that passes its checks")
    return path


def _check_same_data(start: RunStart, cfg: TrainConfig, data_path: Path, allow_changed: bool, main: bool) -> bool:
    """The settings that fix the data order must match the checkpoint's; the data file's content too, unless
    --resume-changed-data accepts the change (then True, with a warning). The sample count is checked once the
    data is tokenized (check_samples)."""
    assert start.state is not None and start.checkpoint is not None
    saved = start.state["data"]
    expected = {"samples_per_step": cfg.train.samples_per_step, "seed": cfg.train.seed, "shuffle": cfg.data.shuffle}
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in expected.items() if saved.get(k) != v]
    if changed:
        raise SameboxError(f"cannot resume from {start.checkpoint}: the data order would differ", problems=changed,
                           hint="resume with the same data and train settings, or start a new output.dir")
    then, now = saved.get("sha256"), start.data_sha256
    if not then or not now or then == now:
        return False
    what = f"data file {data_path}: its content hash differs from the one {start.checkpoint.name} was trained on " \
           f"(sha256 {then[:12]}... then, {now[:12]}... now)"
    if saved.get("path") and Path(saved["path"]) != data_path:
        what += f"; the checkpoint's data file was {saved['path']}"
    if not allow_changed:
        raise SameboxError(f"cannot resume from {start.checkpoint}: the training data changed since it was saved",
                           problems=[what],
                           hint=f"put the data the run was trained on back, pass {CHANGED_DATA_FLAG} to continue on "
                                "the new data (the steps left draw from it), or start a new output.dir")
    if main:
        _warn(f"{CHANGED_DATA_FLAG}: {what}; continuing on the new data")
    return True


def check_samples(start: RunStart, samples: int) -> None:
    """Once the data is tokenized, before the weights: the same number of samples as the checkpoint's (else the
    epoch order differs), unless the data changed by the user's leave."""
    if start.state is None or start.changed_data:
        return
    saved = start.state["data"].get("samples")
    if saved != samples:
        raise SameboxError(f"cannot resume from {start.checkpoint}: the data order would differ",
                           problems=[f"samples: checkpoint {saved!r}, now {samples!r}"],
                           hint="resume with the same data and train settings, or start a new output.dir")
