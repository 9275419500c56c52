"""run_selftest: collect the readings once, judge them with every registered check, return a Report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from builder.core.attention_needs import attention_needs
from builder.core.errors import SameboxError
from builder.core.fsutil import read_text
from builder.core.nvml import read_nvml
from builder.selftest import passes
from builder.selftest.probes import KERNELS
from builder.selftest.readings import collect
from builder.selftest.registry import CHECKS, MODES, judge
from builder.selftest.report import Report


def report_from_readings(readings: dict[str, Any], duration_s: float = 0.0) -> Report:
    """A Report over readings taken earlier (a fixture, or a capture from another machine)."""
    mode = readings.get("mode", "quick")
    return Report(mode, judge(readings, mode), readings, duration_s)


def reused_report(kernels: tuple[str, ...] = KERNELS, model: str | None = None) -> Report | None:
    """The report of a quick or full run that passed on this boot, with these GPUs and this environment, covering
    ``kernels`` and ``model``'s attention: its remembered findings, each saying when it passed (None: there is none;
    the caller runs the self-test)."""
    needs = attention_needs(model)
    record = passes.reusable(read_nvml(), kernels, needs)
    if record is None:
        return None
    kernel_of = {c.name: c.probe.kernel for c in CHECKS if c.probe is not None and c.probe.kernel is not None}
    readings = {"mode": "quick", "model": needs.to_dict(), "kernels": list(kernels),
                "reused": {"passed_at": record.get("passed_at"), "mode": record.get("mode"), "all": True,
                           "checks": sorted(c for c, k in kernel_of.items() if k in kernels)}}
    return Report("quick", passes.reused_findings(record, kernels, kernel_of), readings, 0.0)


def run_selftest(
    mode: str = "quick",
    model: str | None = None,
    data_dir: str | None = None,
    lockfile: str | None = None,
    kernels: tuple[str, ...] = KERNELS,
    reuse: bool = False,
) -> Report:
    """Runs the self-test on this machine. ``model``: a Hugging Face config.json or model dir whose attention
    the kernels are tested for; ``data_dir``: where checkpoints go; ``lockfile``: compare installed packages
    with it (default $SAMEBOX_LOCKFILE, else the catalog image matching this torch and Python); ``kernels``: the
    kernel libraries the job uses (the others are neither imported nor tested); ``reuse``: take the kernel checks
    from a quick or full run that passed on this boot with the same GPUs and environment (builder/selftest/passes.py)
    and run the rest. A run that passes is remembered for the next one to reuse."""
    if mode not in MODES:
        raise SameboxError(f"unknown self-test mode {mode!r}", f"use one of: {', '.join(MODES)}")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise SameboxError(f"unknown kernels: {', '.join(unknown)}", f"choose among: {', '.join(KERNELS)}")
    needs = attention_needs(model)
    if lockfile:  # a user's file: unreadable or not UTF-8 is exit 2 now, not a crashed probe later
        read_text(Path(lockfile), "lockfile", "pass a lockfile written by `samebox lock` (lockfiles/<id>.txt)")
    start = time.perf_counter()
    kernel_of = {c.name: c.probe.kernel for c in CHECKS if c.probe is not None and c.probe.kernel is not None}
    record = passes.reusable(read_nvml(), kernels, needs) if reuse and mode == "quick" else None
    readings = collect(mode, needs, data_dir, lockfile, kernels=() if record else kernels)
    if record is None:
        report = report_from_readings(readings, time.perf_counter() - start)
        passes.remember(readings, report.findings, kernel_of)
        return report
    readings["kernels"] = list(kernels)
    readings["reused"] = {"passed_at": record.get("passed_at"), "mode": record.get("mode"),
                          "checks": sorted(c for c, k in kernel_of.items() if k in kernels)}
    findings = [f for f in judge(readings, mode) if f.check not in kernel_of]
    findings += passes.reused_findings(record, kernels, kernel_of)
    order = {c.name: i for i, c in enumerate(CHECKS)}
    findings.sort(key=lambda f: order.get(f.check, len(order)))
    return Report(mode, findings, readings, time.perf_counter() - start)
