"""One optimizer step's forward/backward: micro-batches under a token budget, loss normalised over the whole step.

Each micro-batch contributes ``sum of its token losses / label tokens of the entire step`` to the gradient, so the
step's gradient is the same whether its samples are packed, padded, split in two or spread over GPUs. Out of
memory halves the budget and redoes the step from a clean gradient.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from builder.core.errors import SameboxError
from trainer.data.batching import MicroBatch
from trainer.model.loss import chunked_cross_entropy_sum


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # sum of token losses over this rank's samples (fp32, on device)
    micro_batches: int
    budget: int  # the token budget the step ended with (halved on OOM)
    oom_retries: int


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16/fp16 compute for everything but the loss (the frozen weights are stored in that dtype already)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_loss_sum(decoder: Any, head: torch.nn.Module, mb: MicroBatch, device: torch.device,
                     dtype: torch.dtype, chunk: int, mark: Callable[[str], None] | None = None) -> torch.Tensor:
    """Sum of token losses of one micro-batch; logits are never materialised for the whole batch. ``mark`` is
    told where the decoder's forward pass ended and where the loss did (trainer/loop/memory.py)."""
    with autocast_context(device, dtype):
        hidden = decoder(**mb.model_inputs(device), use_cache=False).last_hidden_state
    if mark:
        mark("forward")
    loss = chunked_cross_entropy_sum(hidden, head.weight, mb.targets.to(device, non_blocking=True), chunk)
    if mark:
        mark("loss")
    return loss


class StepLoss(torch.nn.Module):
    """A micro-batch's loss sum as one module: the body (hidden states out) and the output projection.

    Under train.shard=fsdp this module is FSDP2's root unit, owning the embeddings, the final norm and lm_head (each
    decoder layer is a unit of its own). The chunked loss reads ``head.weight`` itself instead of calling lm_head
    (whose full logits it exists to avoid), and FSDP2 gathers a unit's weights only around that unit's forward:
    so the read happens in this module's forward, where the root's weights are whole."""

    def __init__(self, decoder: Any, head: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 chunk: int, mark: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.decoder = decoder  # the transformers body (a submodule) or the fused decoder
        self.head = head
        self.device, self.dtype, self.chunk = device, dtype, chunk
        self.mark = mark

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        return forward_loss_sum(self.decoder, self.head, mb, self.device, self.dtype, self.chunk, self.mark)


def run_step(loss_of: Callable[[MicroBatch], torch.Tensor], make_batches: Callable[[int], list[MicroBatch]],
             params: list[torch.nn.Parameter], label_total: int, budget: int, device: torch.device,
             scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
             on_oom: Callable[[int], None] | None = None, retry_oom: bool = True,
             mark: Callable[[str], None] | None = None) -> StepResult:
    """Accumulate the step's gradient into ``params``; ``make_batches(budget)`` cuts the step's samples and
    ``loss_of`` (a StepLoss) gives a micro-batch's loss sum. ``retry_oom=False`` (FSDP2: the other ranks wait in
    a collective for this one, so it cannot redo the step alone) makes out of memory an error at once. ``mark`` is
    told where each backward pass ended."""
    retries = 0
    while True:
        batches = make_batches(budget)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        try:
            for mb in batches:
                loss = loss_of(mb)
                normalised = loss / max(label_total, 1)
                (scale(normalised) if scale else normalised).backward()
                if mark:
                    mark("backward")
                loss_sum += loss.detach()
            return StepResult(loss_sum, len(batches), budget, retries)
        except torch.OutOfMemoryError as e:
            asked = oom_request(str(e))
            longest = max(int(mb.input_ids.shape[-1]) for mb in batches)
            for p in params:
                p.grad = None
            loss = normalised = loss_sum = None  # noqa: F841 - drop references so the cache can be freed
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not retry_oom:
                raise SameboxError(f"out of memory in a micro-batch of up to {budget} tokens under train.shard=fsdp"
                                   f"{asked}",
                                   hint="set train.micro_batch_tokens below that (the sharded ranks cannot halve "
                                        "it on their own), or model.gradient_checkpointing=true") from None
            if all(mb.samples == 1 for mb in batches):
                raise SameboxError(f"out of memory with one sample of {longest} tokens per micro-batch{asked}",
                                   hint="lower data.max_length, set model.gradient_checkpointing=true, or use "
                                        "model.quantization=nf4") from None
            budget = max(1, budget // 2)
            retries += 1
            if on_oom:
                on_oom(budget)


def oom_request(message: str) -> str:
    """torch's out-of-memory message, shortened to what was asked, the card and what this process was allowed:
    " (torch asked for 1.16 GiB; GPU 0: 79.19 GiB, 62.80 GiB free; this process is allowed 16.00 GiB)", or "" when it
    does not say. The allowance (a per-process memory fraction) is why an allocation fails with the card half free."""
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", message)
    if not asked:
        return ""
    parts = [f"torch asked for {asked.group(1)}"]
    card = re.search(r"GPU (\d+) has a total capacity of ([\d.]+ \w+) of which ([\d.]+ \w+) is free", message)
    if card:
        parts.append(f"GPU {card.group(1)}: {card.group(2)}, {card.group(3)} free")
    allowed = re.search(r"([\d.]+ \w+) allowed", message)
    if allowed:
        parts.append(f"this process is allowed {allowed.group(1)}")
    return f" ({'; '.join(parts)})"


def clip_and_check(params: list[torch.nn.Parameter], max_norm: float, loss_sum: torch.Tensor) -> tuple[float, float]:
    """(grad norm, loss sum) as floats; either non-finite means the step must be skipped."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2's DTensor: the norm over all the shards, the same on each rank
        norm = norm.full_tensor()
    # One device->host sync per step, here.
    values = torch.stack([norm.float(), loss_sum.float()]).tolist()
    return values[0], values[1]


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
