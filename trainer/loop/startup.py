"""Where the seconds from the command to step 1 go. Rented GPUs bill from the first second and restart often
(preemption, clones, `--resume auto`), so each run says how long it took to start and on what: the interpreter and
samebox's own imports, the data, the libraries the weights need, the preflight self-test (it runs beside those
imports), the weights loaded (and quantized), and step 1. Marks are seconds since this process started."""

from __future__ import annotations

import os
import time
from typing import Any

# (mark, what the seconds up to it went to), in the order a run reaches them.
STAGES = (("command", "interpreter and samebox"), ("data", "data"), ("imports", "libraries"),
          ("preflight", "preflight (beside the libraries)"), ("weights", "weights"), ("ready", "adapter, optimizer"),
          ("step_1", "step 1"))


def _process_started() -> float:
    """This process's start as a time.time() value (Linux: /proc), else now."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


class Startup:
    """Marks in seconds since this process started; ``stages``: (mark, what the seconds up to it went to), in the
    order a run reaches them (samebox train's STAGES; the peer benchmark's arms have their own)."""

    def __init__(self, stages: tuple[tuple[str, str], ...] = STAGES) -> None:
        self.order = stages
        self.started = _process_started()
        self.marks: dict[str, float] = {}
        self.prefetch: Any = None  # builder.core.readahead.Prefetch: libraries and weights read beside the imports
        self.first_save_s: float | None = None  # the seconds this command's first checkpoint took to save

    def reset(self) -> None:
        """A new command in this process (tests run several): its marks start empty."""
        self.marks.clear()
        self.prefetch = None
        self.first_save_s = None

    def saved(self, seconds: float) -> None:
        """A checkpoint took ``seconds`` to save; the first one of the command is kept (what a restart pays before
        its progress is safe again)."""
        if self.first_save_s is None:
            self.first_save_s = round(seconds, 2)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, round(time.time() - self.started, 2))

    def stages(self) -> dict[str, float]:
        """Seconds spent in each stage reached (from the previous mark reached to this one)."""
        out, last = {}, 0.0
        for name, _ in self.order:
            if name in self.marks:
                out[name] = round(self.marks[name] - last, 2)
                last = self.marks[name]
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds_to": dict(self.marks), "stage_seconds": self.stages()}
        if self.first_save_s is not None:
            out["first_save_s"] = self.first_save_s
        if self.prefetch is not None:
            out["prefetch"] = {"bytes": self.prefetch.total_bytes, "library_bytes": self.prefetch.library_bytes,
                               "read_bytes": self.prefetch.read_bytes, "seconds": self.prefetch.seconds}
        return out

    def line(self) -> str:
        what = dict(self.order)
        parts = ", ".join(f"{what[k]} {v:.1f} s" for k, v in self.stages().items())
        return f"step 1 at {self.marks.get('step_1', 0):.1f} s after the command ({parts})"


STARTUP = Startup()
