"""Progress of a long stage (reading or tokenizing a large data file): done / total with an ETA, redrawn in place
on a terminal; elsewhere (a log file, nohup, a pipe) one line when the stage starts and one when it ends."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """'1h02m' or '3m07s'."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """``with Progress("tokenizing", total, "rows") as p: ... p.update(done)``."""

    def __init__(self, what: str, total: int, unit: str, stream: TextIO | None = None, every_s: float = 0.5,
                 tty: bool | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stderr
        # Under torchrun every process tokenizes; the first one (RANK 0, the launcher's variable) speaks for them.
        self.quiet = stream is None and os.environ.get("RANK", "0") != "0"
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.done = 0
        self.start = self.last = 0.0

    def __enter__(self) -> Progress:
        self.start = self.last = time.monotonic()
        if not self.tty:
            self._print(f"samebox: {self.what}: {self.total:,} {self.unit} ...\n")
        return self

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.tty and now - self.last >= self.every_s:
            self.last = now
            self._print(f"\r\033[Ksamebox: {self.what}: {self.line(now - self.start)}")

    def line(self, elapsed: float) -> str:
        """'12,000/50,000 rows (24%), ETA 0m31s'."""
        text = f"{self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        if 0 < self.done < self.total:
            text += f", ETA {format_duration(elapsed / self.done * (self.total - self.done))}"
        return text

    def __exit__(self, exc_type: object, *_: object) -> None:
        elapsed = time.monotonic() - self.start
        state = "stopped at" if exc_type else "done,"
        summary = f"{state} {self.done:,}/{self.total:,} {self.unit} in {format_duration(elapsed)}"
        self._print(("\r\033[K" if self.tty else "") + f"samebox: {self.what}: {summary}\n")

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        self.stream.write(text)
        self.stream.flush()
