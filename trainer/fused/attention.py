"""Causal attention over packed samples (varlen): each sample attends only to itself, no padding anywhere.

Three backends, best first: flash-attn's varlen kernels (the samebox wheel), torch's own
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10 on CUDA: the same FlashAttention-2 kernels, built into
torch, so packing needs no flash-attn wheel), and scaled_dot_product_attention one sample at a time (CPU, tests).
All take q: (T, Hq, D), k and v: (T, Hk, D) with Hk dividing Hq (grouped-query attention) and run under autograd:
the fused layer recomputes attention in its backward pass and differentiates it there.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from builder.core import compat


@dataclass(frozen=True)
class Packed:
    """Where each sample starts and ends in the packed row."""

    cu_seqlens: torch.Tensor  # int32 (samples + 1,) on the device
    max_len: int
    lengths: tuple[int, ...]  # on the host, for the per-sample fallback


def _flash_attn(q, k, v, packed: Packed, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = packed.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, packed.max_len, packed.max_len, dropout_p=0.0,
                                  softmax_scale=scale, causal=True)


def _torch_varlen(q, k, v, packed: Packed, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = packed.cu_seqlens
    if "window_size" in inspect.signature(varlen_attn).parameters:
        return varlen_attn(q, k, v, cu, cu, packed.max_len, packed.max_len, scale=scale, window_size=(-1, 0))
    return varlen_attn(q, k, v, cu, cu, packed.max_len, packed.max_len, scale=scale, is_causal=True)


def _per_sample_sdpa(q, k, v, packed: Packed, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in packed.lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs, 0)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "sdpa": _per_sample_sdpa}




def available(device: torch.device) -> list[str]:
    """Backends that can run here, best first."""
    names = []
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None and compat.flash_attn2_runs(
                *torch.cuda.get_device_capability(device)):
            names.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("torch_varlen")
    names.append("sdpa")
    return names


def check(name: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> float:
    """Relative error of a backend's output and input gradients against per-sample SDPA in fp32, on two packed
    samples at the model's head layout (catches a backend that runs but mixes samples or mishandles GQA)."""
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = (37, 91)
    t = sum(lengths)
    cu = torch.tensor([0, lengths[0], t], dtype=torch.int32, device=device)
    packed = Packed(cu, max(lengths), lengths)
    base = [torch.randn(t, h, head_dim, generator=gen, device=device) for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(t, heads, head_dim, generator=gen, device=device)
    scale = head_dim ** -0.5

    def run(fn, cast: torch.dtype) -> list[torch.Tensor]:
        ins = [b.to(cast).requires_grad_() for b in base]
        out = fn(*ins, packed, scale)
        out.backward(grad.to(cast))
        return [out.detach().float()] + [i.grad.float() for i in ins]  # detached: no autograd warning at float()

    got, want = run(BACKENDS[name], dtype), run(_per_sample_sdpa, torch.float32)
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


def pick(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
         ) -> tuple[str, list[str]]:
    """The best backend that runs and agrees with the reference; notes say why better ones were passed over."""
    notes = []
    for name in available(device):
        if name == "sdpa":
            return name, notes
        try:
            err = check(name, device, dtype, heads, kv_heads, head_dim)
        except Exception as e:  # a build without this head dim, an old torch signature, ...
            notes.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if err < compat.AGREEMENT_REL_ERROR:
            return name, notes
        notes.append(f"{name}: relative error {err:.1e} against SDPA")
    return "sdpa", notes
