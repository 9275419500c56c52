"""A self-test that passed on a GPU is remembered for the boot, so that what cannot change until the next boot or
install is not tested twice: setup's self-test counts as the trainer's preflight, and a second `samebox train`
reuses the first one's.

What is reused: the kernel checks (flash-attn at the model's head dims, bitsandbytes, SDPA, the fused layers), the
costly part (importing bitsandbytes alone takes seconds). They are reused only on the same boot (the kernel's
boot_id), the same GPUs (their UUIDs, the driver, CUDA_VISIBLE_DEVICES) and the same Python environment (every
installed distribution's version and RECORD digest), when they covered the kernels and attention the run needs.
What is always run again: GPU identity and health counters, memory in use, the short load with its speed and
clocks, matmul accuracy, the data disk, the environment probes. A failed self-test is never remembered.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from builder.core import settings
from builder.core.attention_needs import DEFAULT_HEAD_DIMS, AttentionNeeds
from builder.core.environment import installed_distributions
from builder.core.fsutil import read_remembered, write_atomic
from builder.instance.fingerprint import record_digest
from builder.selftest.findings import Finding

PASS_FILE = "selftest-pass.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
VERSION = 1


def pass_path() -> Path:
    return settings.state_dir() / PASS_FILE


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def environment_key() -> str:
    """This interpreter and every distribution installed for it, by version and RECORD digest (no file is hashed).
    The working directory is left out of the search: `samebox train` run from one directory and setup from another
    see the same environment."""
    here = Path.cwd().resolve()
    path = [p for p in sys.path if p and Path(p).resolve() != here]
    loader = "|".join(os.environ.get(v, "") for v in ("LD_LIBRARY_PATH", "LD_PRELOAD"))  # which CUDA libraries load
    h = hashlib.sha256(f"{sys.executable}\n{platform.python_version()}\n{loader}\n".encode())
    for name, dist in sorted(installed_distributions(path).items()):
        h.update(f"{name}=={dist.version} {record_digest(dist)}\n".encode())
    return h.hexdigest()


def machine_key(nvml: dict[str, Any]) -> dict[str, Any] | None:
    """The boot and the GPUs as NVML read them (``read_nvml``); None where either is unknown (nothing is reused)."""
    boot = boot_id()
    devices = nvml.get("devices") or []
    uuids = [d.get("uuid") for d in devices]
    if not boot or not nvml.get("available") or not uuids or not all(uuids):
        return None
    return {"boot_id": boot, "driver": nvml.get("driver_version"), "gpus": uuids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _covers(recorded: dict[str, Any], needs: AttentionNeeds) -> bool:
    """Whether the attention the pass tested covers what ``needs`` asks for: the same needs, or a plain model
    (no window, no extra features) at head dims the pass tested in the same dtype."""
    wanted = needs.to_dict()
    if {k: v for k, v in recorded.items() if k != "source"} == {k: v for k, v in wanted.items() if k != "source"}:
        return True
    return (not needs.window and not needs.features and recorded.get("dtype") == needs.dtype
            and not recorded.get("window") and not recorded.get("features")
            and set(needs.head_dims) <= set(recorded.get("head_dims") or DEFAULT_HEAD_DIMS))


def reusable(nvml: dict[str, Any], kernels: tuple[str, ...], needs: AttentionNeeds,
             path: Path | None = None) -> dict[str, Any] | None:
    """The remembered pass that covers this run here and now, or None (then the whole self-test runs)."""
    record = read_remembered(path or pass_path())
    if record.get("version") != VERSION:
        return None
    here = machine_key(nvml)
    if here is None or record.get("machine") != here:
        return None
    if not set(kernels) <= set(record.get("kernels") or []):
        return None
    if not isinstance(record.get("model"), dict) or not _covers(record["model"], needs):
        return None
    if record.get("environment") != environment_key():
        return None
    return record


def remember(readings: dict[str, Any], findings: list[Finding], kernel_checks: set[str] | dict[str, str],
             path: Path | None = None) -> bool:
    """Record a passing run's kernel findings for this boot; False (nothing written) when it is not one to reuse:
    a failure, no GPU, a machine it cannot name, or a run that itself reused an earlier pass."""
    torch = readings.get("torch") or {}
    if any(f.severity == "fail" for f in findings) or not torch.get("cuda_available") or readings.get("reused"):
        return False
    here = machine_key(readings.get("nvml") or {})
    if here is None:
        return False
    kept = [f.to_dict() for f in findings if f.check in kernel_checks]
    kernels = list(readings.get("kernels") or [])
    environment, model = environment_key(), readings.get("model") or {}
    # a narrower run (fewer kernels) on the same boot, GPUs, environment and model keeps the wider one's rest
    earlier = read_remembered(path or pass_path())
    if earlier.get("version") == VERSION and earlier.get("machine") == here \
            and earlier.get("environment") == environment and earlier.get("model") == model:
        tested = {f["check"] for f in kept}
        kept += [f for f in earlier.get("findings") or [] if isinstance(f, dict) and f.get("check") not in tested]
        kernels = sorted(set(kernels) | set(earlier.get("kernels") or []))
    record = {"version": VERSION, "machine": here, "environment": environment, "kernels": kernels, "model": model,
              "mode": readings.get("mode"), "passed_at": time.time(), "findings": kept}
    try:
        write_atomic(path or pass_path(), json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError:
        return False  # a state directory that cannot be written: the next run tests everything again
    return True


def reused_findings(record: dict[str, Any], kernels: tuple[str, ...], kernel_of: dict[str, str]) -> list[Finding]:
    """The remembered findings of the kernels this run uses (``kernel_of``: check -> its kernel), each saying when
    they passed."""
    when = time.strftime("%H:%M:%S", time.localtime(record.get("passed_at") or 0))
    out = []
    for f in record.get("findings") or []:
        if not isinstance(f, dict) or f.get("severity") not in ("ok", "warn", "n/a"):
            continue
        if kernel_of.get(f.get("check", "")) not in kernels:
            continue
        out.append(Finding(f["severity"], f"{f.get('message', '')} (passed on this boot at {when}, same GPUs and "
                           "environment: not run again)", f.get("remediation", ""), f.get("check", ""),
                           f.get("group", "")))
    return out
