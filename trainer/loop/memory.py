"""Peak GPU memory by phase of a run: loading, each step's forward, loss, backward and optimizer, saving.

torch's allocator keeps one peak; a phase reads it at its end and resets it, so every phase's peak is its own and
the run's peak is the largest of them. The allocator's counters live on the host: reading them waits for nothing
on the GPU. A step's row says its own peak (``mem_gib``), the summary each phase's largest (``memory_gib``): a run
near the card's limit shows which part to shrink (the micro-batch for the backward pass, train.loss_chunk_tokens
for the loss, the weights for loading).
"""

from __future__ import annotations

import torch

GIB = 2**30
STEP_PHASES = ("forward", "loss", "backward", "optimizer")


class MemoryPhases:
    """Per-phase peaks of allocated memory on one CUDA device (does nothing on another device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.peaks: dict[str, float] = {}  # phase -> its largest peak so far, GiB
        self.step_peak = 0.0
        self.reserved = 0.0  # the allocator's reserved peak, kept across the resets

    def mark(self, phase: str) -> None:
        """The phase that just ended: its peak is recorded and the allocator's peak starts again from now."""
        if not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated(self.device) / GIB
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
        if phase in STEP_PHASES:
            self.step_peak = max(self.step_peak, peak)
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device) / GIB)
        torch.cuda.reset_peak_memory_stats(self.device)

    def take_step_peak(self) -> float | None:
        """The peak of the step that just ended (over its phases), and a fresh start for the next step's."""
        if not self.cuda:
            return None
        peak, self.step_peak = self.step_peak, 0.0
        return peak

    def summary(self) -> dict[str, float]:
        """Each phase's largest peak, and ``train``: the largest of the steps' phases."""
        out = {k: round(v, 4) for k, v in self.peaks.items()}
        steps = [v for k, v in self.peaks.items() if k in STEP_PHASES]
        if steps:
            out["train"] = round(max(steps), 4)
        return out

    def process_peak(self) -> float | None:
        """The largest peak of every phase marked so far and of what ran since the last mark."""
        if not self.cuda:
            return None
        return max([*self.peaks.values(), torch.cuda.max_memory_allocated(self.device) / GIB])

    def process_reserved(self) -> float | None:
        """The largest memory the allocator held from the GPU at any time (reserved: allocated plus its cache)."""
        if not self.cuda:
            return None
        return max(self.reserved, torch.cuda.max_memory_reserved(self.device) / GIB)
