"""Preflight: `samebox selftest --quick` must pass before hours of GPU time are spent on a training run. It tests
the kernels the config uses, flash-attn at the model's head dim, and the disk output.dir is on; it says what it is
doing when it starts and what took the time when it ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from builder.core.errors import SameboxError
from builder.core.output import slowest
from trainer.config import ModelConfig, TrainConfig

# --reuse: the kernel checks of a self-test that passed on this boot with the same GPUs and environment (setup's, or
# an earlier run's preflight) are taken as they are; health, load, accuracy and the data disk run again.
SELFTEST = [sys.executable, "-m", "builder", "selftest", "--quick", "--reuse", "--json"]


class PreflightFailed(Exception):
    """The self-test ran and found a failure: a failing check (exit 1), not a user mistake."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("preflight self-test failed; not starting training")
        self.problems = problems

    def __str__(self) -> str:
        lines = [self.args[0], *(f"  - {p}" for p in self.problems)]
        lines.append("fix the findings (`samebox selftest --quick` shows them), or pass --no-preflight")
        return "\n".join(lines)


def _report(stdout: str) -> dict[str, Any]:
    """The selftest JSON report (schema: docs/selftest.md) when it parses, else {}."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    return report if isinstance(report, dict) else {}


def _failed_checks(report: dict[str, Any]) -> list[str]:
    findings = report.get("findings", [])
    return [f"{f.get('check')}: {f.get('message')} -> {f.get('remediation')}"
            for f in findings if isinstance(f, dict) and f.get("severity") == "fail"][:20]


def kernels_for(cfg: TrainConfig) -> list[str]:
    """The kernel libraries the run will call: flash-attn unless attention is pinned to SDPA or eager, SDPA unless
    pinned to flash-attn or eager (it is auto's fallback), bitsandbytes for NF4, the fused layers' kernels when the
    run can take them."""
    attention = cfg.model.attention
    kernels = []
    if attention in ("auto", "flash_attention_2"):
        kernels.append("flash-attn")
    if attention in ("auto", "sdpa"):
        kernels.append("sdpa")
    if cfg.model.quantization == "nf4":
        kernels.append("bitsandbytes")
    if cfg.train.fused != "false" and cfg.lora.dropout == 0 and cfg.data.packing != "false":
        kernels.append("fused")
    return kernels


def model_config_for_selftest(cfg: ModelConfig) -> str | None:
    """The model's config.json when it is already on this machine (a local directory, or a hub id in the Hugging
    Face cache), so that the self-test runs flash-attn at the model's head dim and with the features it needs (a
    slim or lean build may lack them); None when it is not here yet or the run will not use flash-attn."""
    if cfg.attention in ("sdpa", "eager"):
        return None
    from trainer.model.hub import cached_config, resolve_source

    try:
        source, name = resolve_source(cfg)
    except SameboxError:
        return None  # the run itself reports a bad model.name
    found: str | None = None
    if source == "local":
        found = str(Path(name) / "config.json")
    elif source == "hub":
        found = cached_config(name, cfg.revision)
    if found is None:
        return None
    from builder.core.attention_needs import attention_needs

    try:
        attention_needs(found)
    except SameboxError:
        return None  # a config the self-test cannot read (no head dim, say): it tests its default head dims
    return found


def selftest_command(data_dir: str | None = None, model_config: str | None = None,
                     kernels: list[str] | None = None) -> list[str]:
    return (SELFTEST + (["--data-dir", data_dir] if data_dir else [])
            + (["--model", model_config] if model_config else [])
            + (["--kernels", ",".join(kernels)] if kernels is not None else []))


def preflight_command(cfg: TrainConfig) -> list[str]:
    """The self-test for this run: output.dir's disk, the model's attention (when its config is here), and only
    the kernels the run calls."""
    return selftest_command(str(Path(cfg.output.dir).expanduser()), model_config_for_selftest(cfg.model),
                            kernels_for(cfg))


class Pending:
    """A preflight self-test running in a subprocess while the run does other work (the imports the weights need);
    ``wait()`` returns when it passed and raises as run_preflight does; ``close()`` stops one nobody waits for."""

    def __init__(self, command: list[str] | None, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        self.proc: subprocess.Popen[str] | None = None
        self.start = time.monotonic()
        if command is None:
            return
        shown = " ".join(["samebox", *command[command.index("selftest"):]]) if "selftest" in command else command[0]
        print(f"samebox: preflight: {shown} (GPU health, numerics, the run's kernels, the data disk; "
              "--no-preflight skips it) ...", flush=True)
        # Into files, not pipes: nobody reads a pipe while the command imports, and a self-test that writes more
        # than a pipe holds (NCCL_DEBUG=INFO, a flood of warnings) would stall mid-measurement.
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        try:
            self.proc = subprocess.Popen(command, stdout=self.out, stderr=self.err, text=True)
        except OSError as e:
            raise SameboxError(f"the preflight self-test could not start ({e})",
                               hint="pass --no-preflight to train without it") from None

    def wait(self) -> None:
        if self.proc is None:
            return
        left = max(1.0, self.timeout - (time.monotonic() - self.start))
        try:
            self.proc.wait(timeout=left)
            self.out.seek(0)
            self.err.seek(0)
            stdout, stderr = self.out.read(), self.err.read()
        except subprocess.TimeoutExpired:
            self.close()
            raise SameboxError(f"preflight self-test did not finish in {self.timeout:.0f} s",
                               hint="run `samebox selftest --quick` by hand, or pass --no-preflight") from None
        returncode, self.proc = self.proc.returncode, None
        report = _report(stdout)
        if returncode == 0:
            took = slowest(report.get("timings") or {}, 3)
            took = f" ({took})" if took else ""
            print(f"samebox: preflight passed in {time.monotonic() - self.start:.1f} s{took}", flush=True)
            return
        if "invalid choice" in stderr and "selftest" in stderr:
            raise SameboxError("preflight needs `samebox selftest`, which this samebox does not have",
                               hint="update samebox, or pass --no-preflight to train without the self-test")
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise PreflightFailed(_failed_checks(report) or tail)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for f in (getattr(self, "out", None), getattr(self, "err", None)):
            if f is not None:
                f.close()

    def __enter__(self) -> Pending:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_preflight(cfg: TrainConfig | None = None, command: list[str] | None = None,
                    timeout: float = 600) -> Pending:
    """Start the quick self-test in a subprocess (``command``, default preflight_command(cfg)); its ``wait()``
    stops the run before the weights load when it fails (or when samebox has no selftest)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return Pending(None, timeout)  # one self-test per machine (it checks every local GPU), from its first process
    if command is None:
        if cfg is None:
            raise ValueError("start_preflight needs a config or a command")
        command = preflight_command(cfg)
    return Pending(command, timeout)


def run_preflight(cfg: TrainConfig | None = None, command: list[str] | None = None, timeout: float = 600) -> None:
    """Run the quick self-test and wait for it (start_preflight(...).wait())."""
    with start_preflight(cfg, command, timeout) as pending:
        pending.wait()
