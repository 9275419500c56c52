"""The fused layers' own check on this GPU, which `samebox selftest` runs (builder/cli/selftest.py registers
``fused_layers`` with the self-test's kernel probes): Liger's kernels against the torch reference (the trainer falls
back to the reference when they disagree), and the varlen attention backends against per-sample SDPA, at a
grouped-query layout (28 query heads over 4 key/value heads, as Qwen2.5-7B). ``seconds`` says where the time went."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from builder.core import compat


def _liger(kernels: Any, device: Any) -> dict[str, Any]:
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        return {"installed": False, "error": str(e)[:200]}
    try:
        return {"installed": True, "rel_err": kernels.agreement(kernels.liger_kernels(), device)}
    except Exception as e:  # an API that moved, a Triton that cannot compile here
        return {"installed": True, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def fused_layers(head_dim: int = 128, every_backend: bool = True, liger: bool = True) -> dict[str, Any]:
    """The trainer's fused layers on this GPU: Liger's kernels against the torch reference (the trainer falls back
    to the reference when they disagree), and the varlen attention backends against per-sample SDPA, at a
    grouped-query layout (28 query heads over 4 key/value heads, as Qwen2.5-7B). Quick passes
    ``every_backend=False``, stopping at the first backend that agrees (the one the trainer will pick), and
    ``liger=False``: importing Liger took 10-15 s of a 22 s quick run on an H200, and the trainer checks Liger
    against torch itself before it uses it (trainer.fused.kernels.pick), so quick leaves it to the trainer.
    ``seconds`` says where the time went."""
    import torch

    from trainer.fused import attention, kernels

    device = torch.device("cuda")
    out: dict[str, Any] = {"liger": None, "attention": {}, "seconds": {}}
    start = time.perf_counter()
    out["liger"] = _liger(kernels, device) if liger else {
        "installed": importlib.util.find_spec("liger_kernel") is not None}
    out["seconds"]["liger"] = round(time.perf_counter() - start, 3)
    for name in attention.available(device):
        start = time.perf_counter()
        try:
            out["attention"][name] = attention.check(name, device, torch.bfloat16, 28, 4, head_dim)
        except Exception as e:
            out["attention"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        out["seconds"][name] = round(time.perf_counter() - start, 3)
        agreed = isinstance(out["attention"][name], float) and out["attention"][name] < compat.AGREEMENT_REL_ERROR
        if agreed and not every_backend:
            break
    return out
