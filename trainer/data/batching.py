"""Which samples make an optimizer step, and how they are cut into micro-batches under a token budget.

The step -> samples mapping is a pure function of (seed, step), so the data position in a checkpoint is one number.
Within a step, samples are sorted by length and cut into micro-batches whose tokens (padding included) fit the
budget: packed end to end (one row, position ids restarting per sample) or padded rows of similar length.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.data.dataset import IGNORE, TokenizedData


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int
    label_tokens: int
    samples: int
    attn_kwargs: dict[str, Any] = field(default_factory=dict)

    def model_inputs(self, device: torch.device) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids.to(device, non_blocking=True),
                  "position_ids": self.position_ids.to(device, non_blocking=True)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device, non_blocking=True)
        for key, value in self.attn_kwargs.items():
            inputs[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return inputs


def steps_per_epoch(n_samples: int, samples_per_step: int) -> int:
    return math.ceil(n_samples / samples_per_step)


@functools.lru_cache(maxsize=1)
def epoch_order(n_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch's samples, drawn once for all its steps: a shuffle of a million samples costs
    tens of milliseconds, which every step would otherwise spend with the GPU idle. Kept as one int64 tensor (8 MB
    per million samples; the current epoch's only), of which a step converts its own slice. Shared: read it, never
    write it."""
    return torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + epoch))


def step_indices(n_samples: int, samples_per_step: int, step: int, seed: int, shuffle: bool) -> list[int]:
    """Sample indices of optimizer step ``step`` (0-based, counting across epochs)."""
    epoch, k = divmod(step, steps_per_epoch(n_samples, samples_per_step))
    start, end = k * samples_per_step, min((k + 1) * samples_per_step, n_samples)
    if not shuffle:
        return list(range(start, end))
    return epoch_order(n_samples, seed, epoch)[start:end].tolist()


def plan_micro_batches(lengths: list[int], budget: int, packing: bool) -> list[list[int]]:
    """Positions into ``lengths`` grouped into micro-batches; a sample longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if packing:
        # First-fit decreasing: few, full bins.
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            for b, free in enumerate(room):
                if lengths[i] <= free:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(budget - lengths[i])
        return bins
    # Padded: rows sorted by length, so a micro-batch costs rows * its first (longest) row.
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate_packed(data: TokenizedData, indices: list[int], varlen_kwargs: bool) -> MicroBatch:
    """One row, samples end to end; position ids restart per sample so attention stays within each sample."""
    ids = [t for i in indices for t in data.input_ids[i]]
    targets = [t for i in indices for t in data.targets[i]]
    lengths = [len(data.input_ids[i]) for i in indices]
    positions = [p for n in lengths for p in range(n)]
    kwargs: dict[str, Any] = {}
    if varlen_kwargs:
        # Given up front, flash-attn's varlen path needs no per-layer device->host sync to find them.
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    target_t = torch.tensor([targets])
    return MicroBatch(torch.tensor([ids]), target_t, torch.tensor([positions]), None, len(ids),
                      int((target_t != IGNORE).sum()), len(indices), kwargs)


def collate_padded(data: TokenizedData, indices: list[int], pad_id: int) -> MicroBatch:
    """Right-padded rows with an attention mask; padding positions are never targets."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id)
    targets = torch.full((len(indices), width), IGNORE)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        targets[row, :n] = torch.tensor(data.targets[i])
        mask[row, :n] = 1
    positions = torch.arange(width).expand(len(indices), -1).contiguous()
    return MicroBatch(ids, targets, positions, mask, int(mask.sum()), int((targets != IGNORE).sum()),
                      len(indices))


def idle_micro_batch(pad_id: int, varlen_kwargs: bool) -> MicroBatch:
    """One padding token and no target: a rank with fewer micro-batches than the others runs these under FSDP2,
    whose every forward and backward is a collective of all ranks. Its loss is 0 and its gradients are zeros."""
    kwargs: dict[str, Any] = {}
    if varlen_kwargs:
        cu = torch.tensor([0, 1], dtype=torch.int32)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 1, "max_length_k": 1}
    return MicroBatch(torch.tensor([[pad_id]]), torch.tensor([[IGNORE]]), torch.tensor([[0]]), None, 0, 0, 0, kwargs)


def build_micro_batches(data: TokenizedData, indices: list[int], budget: int, packing: bool, varlen_kwargs: bool,
                        pad_id: int) -> list[MicroBatch]:
    lengths = [len(data.input_ids[i]) for i in indices]
    plan = plan_micro_batches(lengths, budget, packing)
    if packing:
        return [collate_packed(data, [indices[p] for p in group], varlen_kwargs) for group in plan]
    return [collate_padded(data, [indices[p] for p in group], pad_id) for group in plan]
