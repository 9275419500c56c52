"""Frozen linears that share an input, fused into one matrix product, with their LoRA adapters.

q, k and v read the same normalised hidden state, and so do gate and up: each group is one GEMM over the
concatenated weights (one wide product instead of three narrow ones) and one product for all its LoRA A matrices.
4-bit weights (bitsandbytes NF4) are dequantized once per pass into a buffer for the whole group: twice per
micro-batch (forward, backward), where a checkpointed peft model dequantizes each weight three times. Dense
weights are moved into one buffer once, at setup, and the modules keep views of it (no second copy).

Forward:   y = x W^T + b + sum_i s_i (x A_i^T) B_i^T   (over the rows of part i)
Backward:  dx = dy W + sum_i s_i (dy_i B_i) A_i;  dB_i = s_i dy_i^T (x A_i^T);  dA_i = s_i (dy_i B_i)^T x
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_OUT_FORM = True  # bitsandbytes' dequantize_4bit(out=...) on CUDA; it has no CPU kernel for that form


def is_4bit(module: torch.nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # not imported: no module of this process is one of its layers
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quantize_nf4(model: torch.nn.Module, device: torch.device) -> None:
    """Every decoder linear of a model built from a config -> bitsandbytes NF4 (double quant, bf16 compute), as
    BitsAndBytesConfig would load it, on ``device`` (CPU included). For checks of the 4-bit path that have no
    checkpoint to load; peft then wraps the layers with its bitsandbytes LoRA class."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q.to(device))  # .to() quantizes
    model.is_loaded_in_4bit = True


@dataclass
class Part:
    base: torch.nn.Module  # nn.Linear or bnb.nn.Linear4bit, frozen
    lora_a: torch.nn.Parameter | None  # (r, in)
    lora_b: torch.nn.Parameter | None  # (out, r)
    scaling: float

    @property
    def out_features(self) -> int:
        return int(self.base.out_features)


class LinearGroup:
    """Linears of one input, in order (q, k, v or gate, up, or one alone), as one fused product."""

    def __init__(self, parts: list[Part], dtype: torch.dtype) -> None:
        self.parts = parts
        self.dtype = dtype
        self.in_features = int(parts[0].base.in_features)
        self.quantized = [is_4bit(p.base) for p in parts]
        if any(self.quantized) and not all(self.quantized):
            raise ValueError("a fused group mixes 4-bit and dense weights")
        self.rows: list[tuple[int, int]] = []
        start = 0
        for p in parts:
            self.rows.append((start, start + p.out_features))
            start += p.out_features
        self.out_features = start
        self.lora = [i for i, p in enumerate(parts) if p.lora_a is not None]
        self.rank_cols: list[tuple[int, int]] = []
        col = 0
        for i in self.lora:
            r = int(self.parts[i].lora_a.shape[0])  # type: ignore[union-attr]
            self.rank_cols.append((col, col + r))
            col += r
        biases = [p.base.bias for p in parts]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach().to(dtype) if b is not None else
                                   torch.zeros(p.out_features, dtype=dtype, device=b_device(parts))
                                   for b, p in zip(biases, parts, strict=True)])
        self.dense: torch.Tensor | None = None
        if not any(self.quantized):
            self._fuse_dense()

    def _fuse_dense(self) -> None:
        """One (out, in) buffer for the group; each module's weight becomes a view into it."""
        if len(self.parts) == 1:
            self.dense = self.parts[0].base.weight.detach()
            return
        weights = [p.base.weight for p in self.parts]
        fused = torch.cat([w.detach() for w in weights]).to(self.dtype)
        for (lo, hi), w in zip(self.rows, weights, strict=True):
            w.data = fused[lo:hi]
        self.dense = fused

    def params(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters, A then B of each adapted part: the order `grads` returns them in."""
        out: list[torch.nn.Parameter] = []
        for i in self.lora:
            out += [self.parts[i].lora_a, self.parts[i].lora_b]  # type: ignore[list-item]
        return out

    def weight(self) -> torch.Tensor:
        """The group's frozen weight, (out, in), in the compute dtype (dequantized now when 4-bit)."""
        if self.dense is not None:
            return self.dense if self.dense.dtype == self.dtype else self.dense.to(self.dtype)
        import bitsandbytes.functional as bnbf

        first = self.parts[0].base.weight
        out = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=first.device)
        global _OUT_FORM
        for (lo, hi), p in zip(self.rows, self.parts, strict=True):
            state = p.base.weight.quant_state
            if state.dtype == self.dtype and out.is_cuda and _OUT_FORM:
                try:
                    bnbf.dequantize_4bit(p.base.weight.data, state, out=out[lo:hi])
                    continue
                except NotImplementedError:  # a bitsandbytes without the out= kernel: dequantize, then copy
                    _OUT_FORM = False
            out[lo:hi] = bnbf.dequantize_4bit(p.base.weight.data, state).to(self.dtype)
        return out

    def _a(self) -> torch.Tensor:
        return torch.cat([self.parts[i].lora_a.to(self.dtype) for i in self.lora])  # type: ignore[union-attr]

    def lora_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """x A^T for every adapted part (what the B gradients need), or None without LoRA."""
        return x @ self._a().t() if self.lora else None

    def forward(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, x A^T): y = x W^T + b + LoRA; with ``out`` given (a residual), y is added into it.

        Rounding order matters in bf16. The LoRA term starts tiny (B is zero at step 0, lr-sized after the first
        update): added to an already rounded x W^T, or worse to the residual stream, it falls under half an ulp
        and is rounded away every time, so the adapter barely moves the model and training lags. Here it is the
        accumulator the product x W^T is added to (one rounding of x W^T + LoRA); the bias and the residual come
        after, as in transformers + peft.
        """
        if not self.lora:
            y = torch.nn.functional.linear(x, w, self.bias)
            return (y, None) if out is None else (out.add_(y), None)
        xa = self.lora_input(x)
        assert xa is not None
        y = torch.empty(x.shape[0], self.out_features, dtype=self.dtype, device=x.device)
        adapted = dict(zip(self.lora, self.rank_cols, strict=True))
        for i, (lo, hi) in enumerate(self.rows):
            if i in adapted:
                c0, c1 = adapted[i]
                part = self.parts[i]
                y[:, lo:hi].addmm_(xa[:, c0:c1], part.lora_b.to(self.dtype).t(), beta=0,  # type: ignore
                                   alpha=part.scaling)
            else:
                y[:, lo:hi].zero_()
        y.addmm_(x, w.t())
        if self.bias is not None:
            y.add_(self.bias)
        return (y, xa) if out is None else (out.add_(y), xa)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor | None, w: torch.Tensor,
                 need_dx: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(dx, LoRA grads in `params()` order, fp32)."""
        dx = dy @ w if need_dx else None
        if not self.lora:
            return dx, []
        assert xa is not None
        dyb = torch.empty(dy.shape[0], xa.shape[1], dtype=self.dtype, device=dy.device)
        grads_b = []
        for i, (c0, c1) in zip(self.lora, self.rank_cols, strict=True):
            lo, hi = self.rows[i]
            part = self.parts[i]
            dy_i = dy[:, lo:hi]
            grads_b.append((dy_i.t() @ xa[:, c0:c1]).float().mul_(part.scaling))
            dyb[:, c0:c1] = (dy_i @ part.lora_b.to(self.dtype)).mul_(part.scaling)  # type: ignore[union-attr]
        grad_a = (dyb.t() @ x).float()
        if dx is not None:
            dx.addmm_(dyb, self._a())
        grads: list[torch.Tensor] = []
        for (c0, c1), gb in zip(self.rank_cols, grads_b, strict=True):
            grads += [grad_a[c0:c1], gb]
        return dx, grads


def b_device(parts: list[Part]) -> torch.device:
    return next(p.base.weight.device for p in parts)
