"""The fixed header of a GPU results file (bench/README.md: "Results files"): command, machine, GPU, driver,
versions, commit, date. The driver comes from samebox's one NVML reader."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def header(command: str) -> dict:
    import torch

    from builder.core.nvml import read_nvml

    nvml = read_nvml()
    # BENCH_COMMIT: the commit of a working tree copied to another machine, whose .git there may be older.
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"command": command, "machine": platform.node(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "driver": nvml.get("driver_version") or f"unknown ({nvml.get('error')})",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         **{name: _version(name) for name in ("transformers", "peft", "accelerate")}},
            "commit": commit or "(working tree copy, no git)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
