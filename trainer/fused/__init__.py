"""Fused LoRA/QLoRA decoder layers for Llama-family models: the trainer's fast path.

decoder.build() wraps a peft model's body; layer.DecoderLayerFn is one layer's forward and hand-written backward;
linear.LinearGroup fuses projections that share an input (q|k|v, gate|up) with their LoRA adapters and dequantizes
4-bit weights once per pass; kernels picks Liger's Triton kernels or the torch reference; attention picks a varlen
backend; offload keeps the per-layer tensors the backward pass needs, on the host when asked.
"""

from __future__ import annotations

from typing import Any

import torch

from builder.core import settings
from trainer.fused.decoder import FusedDecoder, NotFusable, build
from trainer.fused.kernels import pick as pick_kernels
from trainer.fused.offload import host_available_bytes

__all__ = ["FusedDecoder", "NotFusable", "fused_decoder", "want_offload"]


def want_offload(setting: str, device: torch.device, bytes_needed: int) -> bool:
    """offload_activations: auto = on a GPU when the host has twice the memory the saved tensors take."""
    if setting != "auto":
        return setting == "true"
    return device.type == "cuda" and host_available_bytes() > 2 * bytes_needed


def fused_decoder(model: Any, setting: str, dtype: torch.dtype, device: torch.device, offload: bool,
                  kernels: str | None = None) -> tuple[FusedDecoder | None, str]:
    """(decoder, note): the fused decoder when ``setting`` (train.fused: auto|true|false) allows it and the model
    fits it; otherwise None and why. With ``setting=true`` a model that does not fit is an error.

    For diagnosis, SAMEBOX_FUSED_KERNELS=torch|liger and SAMEBOX_FUSED_ATTENTION=flash_attn|torch_varlen|sdpa
    force a kernel set or an attention backend."""
    kernels = kernels or settings.fused_kernels()
    if setting == "false":
        return None, "transformers + peft layers (train.fused=false)"
    chosen, kernel_note = pick_kernels(device, kernels)
    try:
        decoder = build(model, dtype, device, chosen, offload)
    except NotFusable as e:
        if setting == "true":
            from builder.core.errors import SameboxError

            raise SameboxError(f"train.fused=true but the model cannot use fused layers: {e}",
                               hint="set train.fused=auto (falls back to transformers + peft)") from None
        return None, f"transformers + peft layers ({e})"
    forced = settings.fused_attention()
    if forced:
        decoder.attention = forced
    notes = [kernel_note, *decoder.notes]
    return decoder, f"{decoder.describe()}; {'; '.join(notes)}"
