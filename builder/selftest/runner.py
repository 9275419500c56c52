"""run_selftest: collect the readings once, judge them with every registered check, return a Report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from builder.core.attention_needs import attention_needs
from builder.core.errors import SameboxError
from builder.core.fsutil import read_text
from builder.selftest.probes import KERNELS
from builder.selftest.readings import collect
from builder.selftest.registry import MODES, judge
from builder.selftest.report import Report


def report_from_readings(readings: dict[str, Any], duration_s: float = 0.0) -> Report:
    """A Report over readings taken earlier (a fixture, or a capture from another machine)."""
    mode = readings.get("mode", "quick")
    return Report(mode, judge(readings, mode), readings, duration_s)


def run_selftest(
    mode: str = "quick",
    model: str | None = None,
    data_dir: str | None = None,
    lockfile: str | None = None,
    kernels: tuple[str, ...] = KERNELS,
) -> Report:
    """Runs the self-test on this machine. ``model``: a Hugging Face config.json or model dir whose attention
    the kernels are tested for; ``data_dir``: where checkpoints go; ``lockfile``: compare installed packages
    with it (default $SAMEBOX_LOCKFILE, else the catalog image matching this torch and Python); ``kernels``: the
    kernel libraries the job uses (the others are neither imported nor tested)."""
    if mode not in MODES:
        raise SameboxError(f"unknown self-test mode {mode!r}", f"use one of: {', '.join(MODES)}")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise SameboxError(f"unknown kernels: {', '.join(unknown)}", f"choose among: {', '.join(KERNELS)}")
    needs = attention_needs(model)
    if lockfile:  # a user's file: unreadable or not UTF-8 is exit 2 now, not a crashed probe later
        read_text(Path(lockfile), "lockfile", "pass a lockfile written by `samebox lock` (lockfiles/<id>.txt)")
    start = time.perf_counter()
    readings = collect(mode, needs, data_dir, lockfile, kernels=kernels)
    return report_from_readings(readings, time.perf_counter() - start)
