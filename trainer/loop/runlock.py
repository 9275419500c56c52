"""One run per output directory: an flock on a file in output.dir, held by rank 0 for as long as the run lives.

Two runs in one output.dir would write each other's checkpoint steps and metrics (and ``--overwrite`` would delete
a live run's checkpoints). The kernel drops an flock when its process dies, kill -9 included, so a lock left by a
killed run never blocks the next one; the PID written into the file only names the holder in the message. A run
that ends removes the file while it still holds the lock, so a finished run leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from builder.core.errors import SameboxError

LOCK_FILE = ".samebox-train.lock"


class RunLock:
    """A held lock; ``release()`` (or leaving the ``with`` block, or the process ending) gives it up."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still held: a run that opened this file will see it is gone
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote: 'PID 123 on host, running since 2025-01-01 10:00:00'."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        where = "" if info["host"] == socket.gethostname() else f" on {info['host']}"
        return f"PID {info['pid']}{where}, running since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown (the lock file is being written)"


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    except FileNotFoundError:
        return False


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take output.dir for this run, or a SameboxError naming the process that has it. The directory must exist."""
    path = Path(run_dir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes the run starts
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SameboxError(
                f"output.dir {run_dir} is in use by another samebox train ({holder})",
                hint="wait for that run to end, stop it (SIGTERM saves a checkpoint first), or give this run "
                     "another output.dir") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file its last holder removed as it ended: lock the one at the path now
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return RunLock(fd, path)
