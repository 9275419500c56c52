"""One Llama-family decoder layer (Llama, Qwen2, Mistral) with LoRA, as a single autograd function.

x -> RMSNorm -> q,k,v (one GEMM + LoRA) -> RoPE -> causal varlen attention -> o (+ LoRA) -> + x = x2
x2 -> RMSNorm -> gate|up (one GEMM + LoRA) -> SwiGLU -> down (+ LoRA) -> + x2 = out

The forward pass runs without autograd and keeps two tensors, x and x2 (offloaded to the host when asked); the
backward pass recomputes from them what it needs and writes the gradients itself. Compared with checkpointing
the whole layer, it never recomputes the two products whose outputs the backward pass does not read (o and down:
35% of a layer's weights) and never holds the MLP's (tokens x intermediate) tensors for more than one chunk of
tokens. Attention is the one piece differentiated by autograd, locally, in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.fused.attention import BACKENDS, Packed
from trainer.fused.kernels import Kernels
from trainer.fused.linear import LinearGroup
from trainer.fused.offload import ActivationStore


@dataclass
class LayerSpec:
    index: int
    norm1: torch.Tensor
    eps1: float
    norm2: torch.Tensor
    eps2: float
    qkv: LinearGroup
    o: LinearGroup
    gate_up: LinearGroup
    down: LinearGroup
    heads: int
    kv_heads: int
    head_dim: int
    scale: float

    def groups(self) -> tuple[LinearGroup, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups() for p in g.params()]


@dataclass
class Batch:
    """What every layer of one micro-batch shares."""

    packed: Packed
    cos: torch.Tensor  # (T, D)
    sin: torch.Tensor
    kernels: Kernels
    attention: str
    store: ActivationStore
    mlp_chunk: int


def _split(spec: LayerSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = qkv.shape[0], spec.head_dim
    q_end, k_end = spec.heads * d, (spec.heads + spec.kv_heads) * d
    return (qkv[:, :q_end].view(t, spec.heads, d), qkv[:, q_end:k_end].view(t, spec.kv_heads, d),
            qkv[:, k_end:].view(t, spec.kv_heads, d))


def _attend(spec: LayerSpec, batch: Batch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return BACKENDS[batch.attention](q, k, v, batch.packed, spec.scale)


def _chunks(t: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(t, s + size)) for s in range(0, t, size)]


def layer_forward(spec: LayerSpec, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, x2) without autograd."""
    k_ = batch.kernels
    h1, _ = k_.rms_norm(x, spec.norm1, spec.eps1)
    qkv, _ = spec.qkv.forward(h1, spec.qkv.weight())
    del h1
    q, k, v = _split(spec, qkv)
    q, k = k_.rope(q, k, batch.cos, batch.sin)
    o = _attend(spec, batch, q, k, v).reshape(x.shape[0], -1)
    del q, k, v, qkv
    x2, _ = spec.o.forward(o, spec.o.weight(), out=x.clone())
    del o
    h2, _ = k_.rms_norm(x2, spec.norm2, spec.eps2)
    out = x2.clone()
    w_gu, w_down = spec.gate_up.weight(), spec.down.weight()
    for lo, hi in _chunks(x.shape[0], batch.mlp_chunk):
        gu, _ = spec.gate_up.forward(h2[lo:hi], w_gu)
        a = k_.swiglu(gu)
        del gu
        spec.down.forward(a, w_down, out=out[lo:hi])
    return out, x2


def layer_backward(spec: LayerSpec, batch: Batch, x: torch.Tensor, x2: torch.Tensor, g: torch.Tensor,
                   need_dx: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(dx, LoRA grads in ``spec.params()`` order)."""
    k_ = batch.kernels
    t = x.shape[0]
    # ----- MLP, a chunk of tokens at a time: gate|up recomputed, down never recomputed (its input is enough) ---
    h2, st2 = k_.rms_norm(x2, spec.norm2, spec.eps2)
    w_gu, w_down = spec.gate_up.weight(), spec.down.weight()
    dh2 = torch.empty_like(h2)
    mlp_grads: list[torch.Tensor] | None = None
    for lo, hi in _chunks(t, batch.mlp_chunk):
        hc = h2[lo:hi]
        gu, xa_gu = spec.gate_up.forward(hc, w_gu)
        a = k_.swiglu(gu)
        xa_down = spec.down.lora_input(a)
        da, g_down = spec.down.backward(g[lo:hi], a, xa_down, w_down)
        del a, xa_down
        dgu = k_.swiglu_backward(gu, da)
        del da
        dh, g_gu = spec.gate_up.backward(dgu, hc, xa_gu, w_gu)
        dh2[lo:hi] = dh
        del dgu, dh, gu
        chunk = g_gu + g_down
        mlp_grads = chunk if mlp_grads is None else [acc.add_(c) for acc, c in zip(mlp_grads, chunk, strict=True)]
    del w_gu, w_down, h2
    dx2 = k_.rms_norm_backward(dh2, x2, spec.norm2, st2).add_(g)
    del dh2
    # ----- attention: q,k,v and attention recomputed; o never recomputed (x2 was kept) -------------------------
    h1, st1 = k_.rms_norm(x, spec.norm1, spec.eps1)
    w_qkv = spec.qkv.weight()
    qkv, xa_qkv = spec.qkv.forward(h1, w_qkv)
    q, k, v = _split(spec, qkv)
    q, k = k_.rope(q, k, batch.cos, batch.sin)
    with torch.enable_grad():
        leaves = [q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()]
        o = _attend(spec, batch, *leaves)
    del q, k, v, qkv
    o_flat = o.detach().reshape(t, -1)
    w_o = spec.o.weight()
    do, g_o = spec.o.backward(dx2, o_flat, spec.o.lora_input(o_flat), w_o)
    del w_o, o_flat
    dq, dk, dv = torch.autograd.grad(o, leaves, do.view_as(o))
    del o, leaves, do
    dq, dk = k_.rope_backward(dq, dk, batch.cos, batch.sin)
    dqkv = torch.cat([dq.reshape(t, -1), dk.reshape(t, -1), dv.reshape(t, -1)], dim=1)
    del dq, dk, dv
    dh1, g_qkv = spec.qkv.backward(dqkv, h1, xa_qkv, w_qkv, need_dx=need_dx)
    del dqkv, w_qkv
    dx = k_.rms_norm_backward(dh1, x, spec.norm1, st1).add_(dx2) if need_dx else None
    return dx, g_qkv + g_o + (mlp_grads or [])


class DecoderLayerFn(torch.autograd.Function):
    """apply(x, spec, batch, *spec.params()) -> the layer's output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: LayerSpec, batch: Batch,  # type: ignore[override]
                *lora: torch.Tensor) -> torch.Tensor:
        ctx.spec, ctx.batch = spec, batch
        out, x2 = layer_forward(spec, batch, x)
        batch.store.save(spec.index, x, x2)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        spec, batch = ctx.spec, ctx.batch
        x, x2 = batch.store.load(spec.index)
        if spec.index > 0:
            batch.store.prefetch(spec.index - 1)  # the next layer's backward needs it: copy while this one computes
        dx, grads = layer_backward(spec, batch, x, x2, g.contiguous(), need_dx=ctx.needs_input_grad[0])
        return (dx, None, None, *grads)
