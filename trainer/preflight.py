"""Preflight: `samebox selftest --quick` must pass before hours of GPU time are spent on a training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from builder.errors import SameboxError
from trainer.config import ModelConfig

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


def model_config_for_selftest(cfg: ModelConfig) -> str | None:
    """The model's config.json when it is already on this machine (a local directory, or a hub id in the Hugging
    Face cache), so that the self-test runs flash-attn at the model's head dim and with the features it needs (a
    slim or lean build may lack them); None when it is not here yet or the run will not use flash-attn."""
    if cfg.attention in ("sdpa", "eager"):
        return None
    from trainer.model import resolve_source

    try:
        source, name = resolve_source(cfg)
    except SameboxError:
        return None  # the run itself reports a bad model.name
    found: str | None = None
    if source == "local":
        found = str(Path(name) / "config.json")
    elif source == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(name, "config.json", revision=cfg.revision)
        found = cached if isinstance(cached, str) else None
    if found is None:
        return None
    from builder.selftest.model import attention_needs

    try:
        attention_needs(found)
    except SameboxError:
        return None  # a config the self-test cannot read (no head dim, say): it tests its default head dims
    return found


def selftest_command(data_dir: str | None = None, model_config: str | None = None) -> list[str]:
    return (SELFTEST + (["--data-dir", data_dir] if data_dir else [])
            + (["--model", model_config] if model_config else []))


def run_preflight(data_dir: str | None = None, command: list[str] | None = None, timeout: float = 600,
                  model_config: str | None = None) -> None:
    """Run the quick self-test in a subprocess; a failure (or a missing selftest) stops the run before setup.

    ``data_dir`` (where checkpoints go) gets the self-test's free-space and write+fsync check; ``model_config``
    (model_config_for_selftest) the flash-attn checks at the model's head dim and features.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # one self-test per machine (it checks every local GPU), from each machine's first process
    cmd = command or selftest_command(data_dir, model_config)
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
