"""Data parallelism under torchrun / `accelerate launch`: one process per GPU, LoRA gradients summed by all-reduce
(or, under train.shard=fsdp, by FSDP2's reduce-scatter: trainer/loop/sharding.py).

The launcher starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nothing here
starts a process. Every rank takes a share of each optimizer step's samples (balanced by tokens). Each micro-batch's
loss is divided by the label tokens of the whole step on every rank, so the sum of the ranks' gradients is the
one-process gradient of the same step. LoRA weights are a few MB: one flat all-reduce per step does what DDP's
buckets and hooks would, and leaves gradient checkpointing, 4-bit layers and the OOM retry untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def init(ranks: Ranks) -> None:
    """Join the launcher's process group: NCCL with one GPU per process, gloo on CPU."""
    if ranks.world == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        # The device is set before the group exists, so NCCL never guesses it (a barrier on GPU 0 from every rank).
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")


def shutdown(ranks: Ranks, clean: bool = True) -> None:
    """Leave the process group. After a clean end every rank first waits for the others (rank 0 still writing the
    adapter while rank 1 tore its gloo group down ended in SIGABRT at exit), then the group is destroyed, with no
    collective left in flight. After an error the group is left to the launcher: destroying it while another rank
    sits in a collective can hang."""
    if ranks.world == 1 or not torch.distributed.is_initialized():
        return
    if not clean:
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        torch.distributed.barrier()


def broadcast_params(params: list[torch.nn.Parameter], ranks: Ranks, device: torch.device) -> None:
    """Start every rank from rank 0's LoRA weights (the same seed gives the same init only on the same hardware).
    Sent from ``device``: NCCL sends GPU tensors only, and under train.shard=fsdp the weights are on the host."""
    if ranks.world == 1:
        return
    with torch.no_grad():
        for p in params:
            held = p.data
            sent = held.to(device)  # the same storage when it is already there
            torch.distributed.broadcast(sent, src=0)
            if sent.data_ptr() != held.data_ptr():
                held.copy_(sent)


def most_over_ranks(count: int, device: torch.device, ranks: Ranks) -> int:
    """The largest ``count`` of any rank (FSDP2: every rank runs as many micro-batches as the busiest one)."""
    if ranks.world == 1:
        return count
    t = torch.tensor([count], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_reduce_step(params: list[torch.nn.Parameter], loss_sum: torch.Tensor, ranks: Ranks) -> None:
    """Sum the step's gradients and loss over ranks in one collective per dtype (a rank without samples adds 0).
    Under train.shard=fsdp pass no params: FSDP2's reduce-scatter has summed the gradients already."""
    if ranks.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in [p.grad for p in params] + [loss_sum]:
        groups.setdefault(t.dtype, []).append(t)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))


def exchange(flags: list[bool], values: list[float], device: torch.device, ranks: Ranks
             ) -> tuple[list[bool], list[list[float]]]:
    """One collective for the end of a step: each flag true on every rank when it is true on one (so all ranks save
    and stop at the same step), and every rank's ``values`` (the same count on each), by rank:
    ``[[rank 0's], [rank 1's], ...]``."""
    if ranks.world == 1:
        return list(flags), [list(values)]
    n = len(values)
    t = torch.zeros(len(flags) + ranks.world * n, dtype=torch.float64, device=device)
    t[: len(flags)] = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    start = len(flags) + ranks.rank * n
    t[start:start + n] = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)  # a sum: each rank fills its own slots, the others add zeros
    out = t.tolist()
    per_rank = [out[len(flags) + r * n: len(flags) + (r + 1) * n] for r in range(ranks.world)]
    return [v > 0 for v in out[: len(flags)]], per_rank


class StepClock:
    """Where a rank's step went, without a sync of its own: CUDA events on the compute stream (read after the
    step's one device->host sync has passed them), wall clock on a CPU. ``mark(name)`` in order; ``span(a, b)``
    in seconds once the later mark has completed."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def span(self, a: str, b: str) -> float:
        start, end = self.marks[a], self.marks[b]
        if self.cuda:
            return start.elapsed_time(end) / 1000  # type: ignore[attr-defined]
        return float(end) - float(start)  # type: ignore[arg-type]


def share_of_step(indices: list[int], lengths: list[int], ranks: Ranks) -> list[int]:
    """This rank's samples of a step: longest first, each to the rank with the fewest tokens so far.

    The step waits for its slowest rank, so ranks get about equal tokens rather than equal sample counts.
    A pure function of the step's samples: every rank computes the same split without talking.
    """
    if ranks.world == 1:
        return list(indices)
    load = [0] * ranks.world
    mine: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        target = min(range(ranks.world), key=lambda r: load[r])
        load[target] += lengths[i]
        if target == ranks.rank:
            mine.append(i)
    return mine
