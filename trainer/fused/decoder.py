"""The fused decoder: a peft-wrapped Llama/Qwen2/Mistral model's body run layer by layer through DecoderLayerFn.

It uses the model's own modules and parameters (embeddings, norms, rotary embedding, frozen weights, peft's LoRA
A/B matrices): nothing is copied or re-initialised, checkpoints and the saved adapter are peft's as before. A
model it cannot run exactly (another architecture, LoRA dropout, DoRA, sliding windows, trainable parameters
outside the seven projections) is left to the transformers + peft path, with the reason.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from builder.core import settings
from trainer.fused import attention as attn
from trainer.fused.kernels import Kernels
from trainer.fused.layer import Batch, DecoderLayerFn, LayerSpec
from trainer.fused.linear import LinearGroup, Part
from trainer.fused.offload import ActivationStore

ARCHITECTURES = ("llama", "qwen2", "mistral")
ADAPTER = "default"


class NotFusable(Exception):
    """Why a model stays on the transformers + peft path."""


def _part(module: torch.nn.Module) -> Part:
    """A projection as peft left it: a LoRA layer around a frozen base, or the frozen base alone."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return Part(module, None, None, 1.0)
    if getattr(module, "merged", False) or list(module.active_adapters) != [ADAPTER]:
        raise NotFusable("a merged adapter or several active adapters")
    if module.use_dora.get(ADAPTER, False):
        raise NotFusable("DoRA (lora.use_dora)")
    if ADAPTER not in module.lora_A:
        return Part(module.get_base_layer(), None, None, 1.0)
    dropout = module.lora_dropout[ADAPTER]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        raise NotFusable(f"LoRA dropout {dropout.p} (the fused layers need lora.dropout=0)")
    return Part(module.get_base_layer(), module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight,
                float(module.scaling[ADAPTER]))


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or not hasattr(module, "weight"):
        raise NotFusable(f"an unknown norm {type(module).__name__}")
    return module.weight.detach(), float(eps)


def layer_spec(index: int, layer: torch.nn.Module, dtype: torch.dtype) -> LayerSpec:
    sa, mlp = layer.self_attn, layer.mlp
    extra = {name for name, _ in sa.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb"}
    if extra:
        raise NotFusable(f"attention with {sorted(extra)}")
    if getattr(sa, "sliding_window", None):
        raise NotFusable("sliding-window attention")
    act = getattr(mlp, "act_fn", None)
    if type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise NotFusable(f"MLP activation {type(act).__name__} (the fused MLP is SwiGLU)")
    n1, e1 = _norm(layer.input_layernorm)
    n2, e2 = _norm(layer.post_attention_layernorm)
    config = sa.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(sa, "head_dim", config.hidden_size // heads)
    return LayerSpec(
        index, n1, e1, n2, e2,
        LinearGroup([_part(sa.q_proj), _part(sa.k_proj), _part(sa.v_proj)], dtype),
        LinearGroup([_part(sa.o_proj)], dtype),
        LinearGroup([_part(mlp.gate_proj), _part(mlp.up_proj)], dtype),
        LinearGroup([_part(mlp.down_proj)], dtype),
        heads, kv_heads, head_dim, float(getattr(sa, "scaling", head_dim ** -0.5)))


class FinalNormFn(torch.autograd.Function):
    """The model's last RMSNorm with the same kernels: keeps its input and rstd, not autograd's fp32 copies."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,  # type: ignore[override]
                kernels: Kernels) -> torch.Tensor:
        y, state = kernels.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.kernels = state, kernels
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return ctx.kernels.rms_norm_backward(dy.contiguous(), x, weight, ctx.state), None, None, None


MLP_CHUNK_BYTES = 2**29  # a chunk's (tokens x intermediate) tensors, four of them at once


def mlp_chunk_tokens(intermediate: int, elem: int) -> int:
    """Tokens the MLP runs at a time: MLP_CHUNK_BYTES of (chunk x intermediate) tensors at most, in multiples of
    1024 (7B: 3k tokens, still a GEMM that fills the GPU); $SAMEBOX_MLP_CHUNK_TOKENS for diagnosis."""
    return settings.mlp_chunk_tokens() or max(1024, (MLP_CHUNK_BYTES // (4 * intermediate * elem)) // 1024 * 1024)


class FusedDecoder:
    """Called like the transformers model body on a packed micro-batch: returns ``.last_hidden_state``."""

    def __init__(self, body: Any, specs: list[LayerSpec], dtype: torch.dtype, device: torch.device,
                 kernels: Kernels, attention: str, offload: bool, notes: list[str]) -> None:
        self.body, self.specs, self.dtype, self.device = body, specs, dtype, device
        self.kernels, self.attention, self.offload = kernels, attention, offload
        self.notes = notes
        self.store = ActivationStore(device, offload)
        config = body.config
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.mlp_chunk = mlp_chunk_tokens(self.intermediate, torch.finfo(dtype).bits // 8)

    def describe(self) -> str:
        return (f"fused layers ({self.kernels.name} kernels, {self.attention} attention, "
                f"activations {'offloaded to the host' if self.offload else 'kept on the device'})")

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seq_lens_q: torch.Tensor | None = None,
                 max_length_q: int | None = None, **_: Any) -> SimpleNamespace:
        if input_ids.shape[0] != 1:
            raise ValueError("the fused decoder takes one packed row (samples end to end)")
        t = input_ids.shape[1]
        if cu_seq_lens_q is None or max_length_q is None:  # boundaries from where positions restart (a sync)
            starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [t]
            cu_seq_lens_q = torch.tensor(starts, dtype=torch.int32)
            max_length_q = max(b - a for a, b in zip(starts, starts[1:], strict=False))
        cu = cu_seq_lens_q.to(self.device, torch.int32)
        lengths = tuple(cu.diff().tolist()) if self.attention == "sdpa" else ()
        x = self.body.embed_tokens(input_ids).reshape(t, self.hidden).to(self.dtype)
        cos, sin = self.body.rotary_emb(x[None], position_ids)
        self.store.clear()
        batch = Batch(attn.Packed(cu, int(max_length_q), lengths), cos[0].to(self.dtype), sin[0].to(self.dtype),
                      self.kernels, self.attention, self.store, self.mlp_chunk)
        for spec in self.specs:
            x = DecoderLayerFn.apply(x, spec, batch, *spec.params())
        norm = self.body.norm
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        hidden = FinalNormFn.apply(x, norm.weight.detach(), eps, self.kernels)
        return SimpleNamespace(last_hidden_state=hidden.view(1, t, self.hidden))

    def bytes_per_token(self) -> int:
        """GPU memory one more token of a micro-batch costs at the peak (one layer's backward pass), plus what is
        kept for every layer when activations stay on the GPU."""
        s = self.specs[0]
        elem = torch.finfo(self.dtype).bits // 8
        qkv = s.qkv.out_features
        live = 16 * self.hidden + 3 * qkv  # x, x2 (+ the next layer's in flight), norms, q,k,v, o, their grads
        kept = 0 if self.offload else 2 * self.hidden * len(self.specs)
        return (live + kept) * elem

    def fixed_bytes(self) -> int:
        """Memory a micro-batch needs whatever its length: the dequantized weights of one layer and the MLP chunk."""
        s = self.specs[0]
        elem = torch.finfo(self.dtype).bits // 8
        weights = sum(g.out_features * g.in_features for g in s.groups())
        return (weights + 5 * self.mlp_chunk * self.intermediate) * elem


def build(model: Any, dtype: torch.dtype, device: torch.device, kernels: Kernels, offload: bool) -> FusedDecoder:
    """The fused decoder for a peft model, or NotFusable saying why not."""
    base = model.get_base_model()
    config = base.config
    if config.model_type not in ARCHITECTURES:
        raise NotFusable(f"model type {config.model_type} (fused layers exist for {', '.join(ARCHITECTURES)})")
    body = getattr(base, base.base_model_prefix)
    if not hasattr(body, "rotary_emb") or not hasattr(body, "layers"):
        raise NotFusable("a transformers version whose model has no shared rotary embedding")
    specs = [layer_spec(i, layer, dtype) for i, layer in enumerate(body.layers)]
    covered = {id(p) for s in specs for p in s.params()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if trainable:
        raise NotFusable(f"trainable parameters outside the projections ({trainable[0]}, ...)")
    if not covered:
        raise NotFusable("no LoRA adapter on any projection")
    s = specs[0]
    name, notes = attn.pick(device, dtype, s.heads, s.kv_heads, s.head_dim)
    return FusedDecoder(body, specs, dtype, device, kernels, name, offload, notes)
