"""Cross-entropy over the vocabulary, a chunk of tokens at a time, so full fp32 logits never exist.

With a 152k vocabulary, fp32 logits for 16k tokens are 10 GB (and their gradient as much again): they, not the
model, set the peak memory. Here only label positions are projected, ``chunk`` rows at a time; the gradient with
respect to the hidden states is computed in the same pass (the output projection is frozen under LoRA), so the
backward pass has nothing to recompute and keeps one (tokens x hidden) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.dataset import IGNORE

# train.loss_chunk_tokens=auto: rows of fp32 logits per chunk within this many bytes (a 152k vocabulary: 256 rows,
# 156 MB, plus its bf16 copy for the gradient). 1,024 rows (623 MB) set the 7B QLoRA's peak memory on short rows.
AUTO_CHUNK_BYTES = 160 * 2**20
MIN_CHUNK_ROWS = 64


def loss_chunk_rows(setting: int | str, vocab_size: int) -> int:
    """Tokens per loss chunk: train.loss_chunk_tokens, or under 'auto' as many as AUTO_CHUNK_BYTES of fp32 logits
    hold (a multiple of 64, at least 64)."""
    if setting != "auto":
        return int(setting)
    rows = AUTO_CHUNK_BYTES // (4 * max(1, vocab_size))
    return max(MIN_CHUNK_ROWS, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits, or fp64 when given fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            rows = torch.arange(y.shape[0], device=y.device)
            logits = F.linear(h, w).to(acc)
            # One (chunk x vocab) fp32 buffer serves the loss and its gradient, all in place: the targets' logits,
            # then exp(logits - max), its sum, softmax - onehot (torch.logsumexp would add an fp32 temporary of the
            # buffer's size; cross_entropy + softmax kept three such buffers alive at once).
            target = logits[rows, y]
            top = logits.amax(-1)
            probs = logits.sub_(top[:, None]).exp_()
            norm = probs.sum(-1)
            total += (top + norm.log() - target).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs.div_(norm[:, None])
            probs[rows, y] -= 1
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (probs.to(w.dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h.to(acc)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0),
                              grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``targets`` (IGNORE positions skipped).

    hidden: (..., H); targets: (...) aligned with hidden (already shifted); weight: (V, H).
    """
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h, weight, flat_targets[keep], chunk)
