"""The fused layer's element-wise kernels: RMSNorm, SwiGLU over a fused gate|up tensor, rotary embedding.

Each has a forward and an explicit backward, because the fused layer writes its own backward pass. Two
implementations: plain torch (the reference; CPU, and GPUs without Liger), and Liger Kernel's Triton kernels
(`liger-kernel`, Apache-2.0) on CUDA, where one kernel reads and writes each tensor once instead of the half a
dozen passes the torch ops take (RMSNorm alone is six kernels over fp32 copies in transformers' own code).
``pick()`` checks Liger against the reference on the GPU once, and keeps the reference when Liger is missing,
its API moved, or its results disagree.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from builder.core import compat


# ----- the reference (torch) ----------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, Any]:
    """transformers' Llama/Qwen2 RMSNorm: fp32 statistics, normalised value rounded to x's dtype, then * weight."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_torch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: Any) -> torch.Tensor:
    """d/dx of rms_norm_torch (the norm's weight is frozen: no weight gradient)."""
    x32 = x.float()
    g = dy.float() * weight.float()
    xhat = x32 * rstd
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype)


def swiglu_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over ``[..., gate | up]`` (transformers: act_fn(gate_proj(x)) * up_proj(x))."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward_torch(gate_up: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to ``[gate | up]``, written over gate_up (which the caller no longer needs)."""
    gate, up = gate_up.chunk(2, dim=-1)
    g32 = gate.float()
    sig = torch.sigmoid(g32)
    silu = g32 * sig
    d_gate = da.float() * up.float() * (sig * (1 + g32 * (1 - sig)))
    d_up = da.float() * silu
    gate.copy_(d_gate)
    up.copy_(d_up)
    return gate_up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * (sin * sign)


def rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D), k: (T, Hk, D); cos/sin: (T, D) in the duplicated [f, f] layout transformers uses."""
    c, s = cos[:, None, :], sin[:, None, :]
    return _rotate(q, c, s, 1.0), _rotate(k, c, s, 1.0)


def rope_backward_torch(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotation's transpose is the rotation by the opposite angle."""
    c, s = cos[:, None, :], sin[:, None, :]
    return _rotate(dq, c, s, -1.0), _rotate(dk, c, s, -1.0)


# ----- Liger Kernel --------------------------------------------------------------------------------------------
class _LigerNorm:
    """Liger's RMSNorm in "llama" casting mode (fp32 statistics, like transformers); its backward needs the
    launch settings its forward chose, so the forward returns them with rstd."""

    def __init__(self) -> None:
        from liger_kernel.ops import rms_norm

        self.mod = rms_norm

    def forward(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, Any]:
        y, _x, rstd, block, warps, mode = self.mod.rms_norm_forward(x, weight, eps, 0.0, "llama", None)
        return y, (rstd, block, warps, mode)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, state: Any) -> torch.Tensor:
        rstd, block, warps, mode = state
        dx, _dw = self.mod.rms_norm_backward(dy.contiguous(), x, weight, rstd, 0.0, mode, block, warps, False, None,
                                             needs_dw=False)
        return dx


def _liger_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import swiglu_fused_gate_up_forward

    return swiglu_fused_gate_up_forward(gate_up)[1]


def _liger_swiglu_backward(gate_up: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import swiglu_fused_gate_up_backward

    return swiglu_fused_gate_up_backward(gate_up, da.contiguous(), in_place=True)


def _liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from liger_kernel.ops.rope import rope_backward, rope_forward

    # Liger takes (batch, heads, seq, dim) views of (batch, seq, heads, dim) storage and works in place on a
    # contiguous copy; a packed micro-batch is one row of T tokens.
    fn = rope_backward if backward else rope_forward
    out = fn(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos.unsqueeze(0), sin.unsqueeze(0))
    return out[0].transpose(1, 2)[0], out[1].transpose(1, 2)[0]


# ----- selection -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Any
    rms_norm_backward: Any
    swiglu: Any
    swiglu_backward: Any
    rope: Any
    rope_backward: Any


TORCH = Kernels("torch", rms_norm_torch, rms_norm_backward_torch, swiglu_torch, swiglu_backward_torch, rope_torch,
                rope_backward_torch)


def liger_kernels() -> Kernels:
    norm = _LigerNorm()
    return Kernels("liger", norm.forward, norm.backward, _liger_swiglu, _liger_swiglu_backward, _liger_rope,
                   lambda dq, dk, cos, sin: _liger_rope(dq, dk, cos, sin, backward=True))


def agreement(candidate: Kernels, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Worst relative error of ``candidate`` against the torch reference on random inputs (forward and backward
    of each kernel), at a Qwen-like shape."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    t, h, inter, heads, kv, d = 257, 512, 1376, 8, 2, 64
    x, w, dy = rand(t, h), rand(h), rand(t, h)
    worst = 0.0
    y_ref, st_ref = TORCH.rms_norm(x, w, 1e-6)
    y, st = candidate.rms_norm(x, w, 1e-6)
    worst = max(worst, rel(y, y_ref), rel(candidate.rms_norm_backward(dy, x, w, st),
                                          TORCH.rms_norm_backward(dy, x, w, st_ref)))
    gu, da = rand(t, 2 * inter), rand(t, inter)
    worst = max(worst, rel(candidate.swiglu(gu.clone()), TORCH.swiglu(gu)))
    worst = max(worst, rel(candidate.swiglu_backward(gu.clone(), da), TORCH.swiglu_backward(gu.clone(), da)))
    q, k = rand(t, heads, d), rand(t, kv, d)
    ang = torch.arange(t, device=device, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=gen,
                                                                                  device=device)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    for fn, ref in ((candidate.rope, TORCH.rope), (candidate.rope_backward, TORCH.rope_backward)):
        got, want = fn(q.clone(), k.clone(), cos, sin), ref(q, k, cos, sin)
        worst = max(worst, rel(got[0], want[0]), rel(got[1], want[1]))
    return worst


def pick(device: torch.device, want: str = "auto") -> tuple[Kernels, str]:
    """(kernels, note). ``want``: auto (Liger on CUDA when it installs and agrees with torch), liger, torch."""
    if want == "liger":
        return liger_kernels(), "Liger kernels (forced, unchecked)"
    if want == "torch" or device.type != "cuda":
        return TORCH, "torch kernels" + ("" if want == "torch" else f" ({device.type})")
    if importlib.util.find_spec("liger_kernel") is None:
        return TORCH, "torch kernels (liger-kernel is not installed)"
    try:
        liger = liger_kernels()
        err = agreement(liger, device)
    except Exception as e:  # an API that moved between Liger versions, a Triton that cannot compile here
        return TORCH, f"torch kernels (Liger failed its check: {type(e).__name__}: {str(e)[:120]})"
    if not err < compat.AGREEMENT_REL_ERROR:
        return TORCH, f"torch kernels (Liger disagreed with torch: relative error {err:.1e})"
    return liger, f"Liger kernels (checked against torch: {err:.1e})"
