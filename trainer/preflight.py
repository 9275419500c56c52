"""Preflight: `samebox selftest --quick` must pass before hours of GPU time are spent on a training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from builder.errors import SameboxError

SELFTEST = [sys.executable, "-m", "builder.cli", "selftest", "--quick", "--json"]


class PreflightFailed(Exception):
    """The self-test ran and found a failure: a failing check (exit 1), not a user mistake."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("preflight self-test failed; not starting training")
        self.problems = problems

    def __str__(self) -> str:
        lines = [self.args[0], *(f"  - {p}" for p in self.problems)]
        lines.append("fix the findings (`samebox selftest --quick` shows them), or pass --no-preflight")
        return "\n".join(lines)


def _failed_checks(stdout: str) -> list[str]:
    """Failed findings from the selftest JSON report (schema: docs/selftest.md), when it parses; else nothing."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return []
    findings = report.get("findings", []) if isinstance(report, dict) else []
    return [f"{f.get('check')}: {f.get('message')} -> {f.get('remediation')}"
            for f in findings if isinstance(f, dict) and f.get("severity") == "fail"][:20]


def run_preflight(data_dir: str | None = None, command: list[str] | None = None, timeout: float = 600) -> None:
    """Run the quick self-test in a subprocess; a failure (or a missing selftest) stops the run before setup.

    ``data_dir`` (where checkpoints go) gets the self-test's free-space and write+fsync check.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # one self-test per machine (it checks every local GPU), from each machine's first process
    cmd = command or SELFTEST + (["--data-dir", data_dir] if data_dir else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SameboxError(f"preflight self-test did not finish in {timeout:.0f} s",
                           hint="run `samebox selftest --quick` by hand, or pass --no-preflight") from None
    if proc.returncode == 0:
        return
    if "invalid choice" in proc.stderr and "selftest" in proc.stderr:
        raise SameboxError("preflight needs `samebox selftest`, which this samebox does not have",
                           hint="update samebox, or pass --no-preflight to train without the self-test")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise PreflightFailed(_failed_checks(proc.stdout) or tail)
