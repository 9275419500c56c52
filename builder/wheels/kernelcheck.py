"""flash-attn's GPU code, checked the same way by the wheel verifier (builder/wheels/verify.py) and the self-test
(builder/selftest/kernel_probes.py): which SASS architectures `cuobjdump --list-elf` finds in its extension,
and flash_attn_varlen_func forward and backward against an fp32 SDPA reference.

It imports nothing from builder: the wheel verifier runs this file in the target environment's Python, with the
unpacked wheel on its path (``python -c 'runpy.run_path(...)'``; it prints the numeric check's JSON).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

# bf16 carries 8 bits of mantissa (eps 2**-8 = 3.9e-3); flash-attn's own tests allow twice SDPA's bf16 error.
# Relative error ||x - ref||_F / ||ref||_F against an fp32 SDPA reference, for the output and each gradient.
# Packed sequences of uneven lengths (one longer than a 128-row tile), as training batches are.
SEQLENS = (37, 128, 211, 64)
HEADS = 8
DEFAULT_CUDA_HOME = "/usr/local/cuda"
_ELF_SM = re.compile(r"\.sm_(\d+)[a-z]?\.cubin")  # sm_90a, sm_100f: arch-specific variants of the same SASS


class CuobjdumpError(RuntimeError):
    """`cuobjdump --list-elf` failed on a file (its stderr is the message)."""


def find_cuobjdump(env: dict[str, str] | None = None) -> str | None:
    """cuobjdump of the CUDA toolkit in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda, else on $PATH; None if none."""
    env = dict(os.environ) if env is None else env
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), DEFAULT_CUDA_HOME):
        if home and (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump")
    return shutil.which("cuobjdump", path=env.get("PATH"))


def elf_archs(shared_object: str | Path, cuobjdump: str) -> tuple[str, ...]:
    """The SASS architectures in a CUDA library per `cuobjdump --list-elf`, sorted: ('8.0', '9.0', '10.0')."""
    res = subprocess.run([cuobjdump, "--list-elf", str(shared_object)], capture_output=True, text=True,
                         timeout=120, check=False)
    if res.returncode != 0:
        raise CuobjdumpError(res.stderr.strip()[:300] or f"exit {res.returncode}")
    codes = {int(m.group(1)) for m in _ELF_SM.finditer(res.stdout)}
    return tuple(f"{c // 10}.{c % 10}" for c in sorted(codes))


def varlen_errors(varlen_func: Any, head_dim: int = 128, dtype: Any = None, window: int | None = None,
                  seqlens: tuple[int, ...] = SEQLENS, heads: int = HEADS, device: str = "cuda") -> dict[str, float]:
    """``varlen_func`` (flash_attn_varlen_func) forward and backward over packed causal sequences against fp32
    SDPA run on each sequence alone (a sliding ``window`` when given): relative errors of the output and of
    dq, dk, dv. ``dtype``: default bfloat16."""
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(sum(seqlens), heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, *seqlens], device=device).cumsum(0).to(torch.int32)
    window_size = (window, 0) if window else (-1, -1)
    out = varlen_func(q, k, v, cu, cu, max(seqlens), max(seqlens), causal=True, window_size=window_size)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]

    ref_out, ref_grads = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].detach().float().transpose(0, 1).requires_grad_() for t in (q, k, v))
        i = torch.arange(e - s, device=device)
        mask = i[None, :] <= i[:, None]
        if window:
            mask &= i[:, None] - i[None, :] <= window
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        ref_grads.append(torch.autograd.grad(o, (qs, ks, vs), grad[s:e].float().transpose(0, 1)))
        ref_out.append(o.transpose(0, 1))
    refs = [torch.cat(ref_out)] + [torch.cat([gs[j].transpose(0, 1) for gs in ref_grads]) for j in range(3)]
    return {name: ((x.float() - ref).norm() / ref.norm()).item()
            for name, x, ref in zip(("out", "dq", "dk", "dv"), got, refs, strict=True)}


def numeric_reading(head_dim: int = 128) -> dict[str, Any]:
    """The importable flash_attn's varlen errors at ``head_dim`` in bf16, with what was run and where."""
    import torch
    from flash_attn import flash_attn_varlen_func

    return {"rel_err": varlen_errors(flash_attn_varlen_func, head_dim), "device": torch.cuda.get_device_name(0),
            "seqlens": list(SEQLENS), "heads": HEADS, "head_dim": head_dim, "dtype": "bfloat16"}


if __name__ == "__main__":
    print(json.dumps(numeric_reading()))
