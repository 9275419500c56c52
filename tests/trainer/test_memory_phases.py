"""Per-phase memory peaks (trainer/loop/memory.py): each phase reads the allocator's peak since the last mark and
starts it again, a step's row gets its own peak, and the summary separates loading from the steps."""

from __future__ import annotations

import torch

from trainer.loop import memory as memory_mod
from trainer.loop.memory import MemoryPhases

GIB = 2**30


class FakeAllocator:
    """torch.cuda's peak counters: ``use(gib)`` allocates at a level, the peak follows until reset."""

    def __init__(self) -> None:
        self.level = self.peak = self.reserved = 0.0

    def use(self, gib: float) -> None:
        self.level = gib
        self.peak = max(self.peak, gib)
        self.reserved = max(self.reserved, gib + 0.5)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(memory_mod.torch.cuda, "max_memory_allocated", lambda device=None: self.peak * GIB)
        monkeypatch.setattr(memory_mod.torch.cuda, "max_memory_reserved", lambda device=None: self.reserved * GIB)

        def reset(device=None):
            self.peak = self.level
            self.reserved = self.level + 0.5
        monkeypatch.setattr(memory_mod.torch.cuda, "reset_peak_memory_stats", reset)


def test_phases_keep_loading_out_of_the_steps_peak(monkeypatch):
    alloc = FakeAllocator()
    alloc.install(monkeypatch)
    mem = MemoryPhases(torch.device("cuda", 0))
    alloc.use(9.0)  # bf16 weights read before quantizing: a loading peak no step reaches
    alloc.use(4.0)
    mem.mark("load")
    rows = []
    for activations, logits in ((2.0, 1.0), (1.5, 0.5)):
        alloc.use(4.0 + activations)
        mem.mark("forward")
        alloc.use(4.0 + activations + logits)
        mem.mark("loss")
        alloc.use(4.2)
        mem.mark("backward")
        alloc.use(4.3)
        mem.mark("optimizer")
        rows.append(mem.take_step_peak())
    assert rows == [7.0, 6.0]  # each step its own peak, not the largest so far
    summary = mem.summary()
    assert summary["load"] == 9.0 and summary["train"] == 7.0
    assert summary["forward"] == 6.0 and summary["loss"] == 7.0 and summary["optimizer"] == 4.3
    assert mem.process_peak() == 9.0
    assert mem.process_reserved() == 9.5
    alloc.use(11.0)  # after the last mark (a save): still in the process's peak
    assert mem.process_peak() == 11.0


def test_phases_do_nothing_off_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the CUDA allocator was asked on a CPU run")
    monkeypatch.setattr(memory_mod.torch.cuda, "max_memory_allocated", boom)
    mem = MemoryPhases(torch.device("cpu"))
    mem.mark("load")
    mem.mark("forward")
    assert mem.take_step_peak() is None and mem.process_peak() is None and mem.process_reserved() is None
    assert mem.summary() == {}


def test_a_cpu_run_marks_every_phase_of_a_step(make_config, monkeypatch):
    """The recipe tells its MemoryPhases where each phase ends, in order: loading, then per step each micro-batch's
    forward, loss and backward and the step's optimizer, then the save."""
    from trainer.loop.recipe import main

    seen: list[str] = []
    real = MemoryPhases.mark
    monkeypatch.setattr(MemoryPhases, "mark", lambda self, phase: (seen.append(phase), real(self, phase))[1])
    cfg = make_config(overrides=("train.max_steps=2",))
    assert main(cfg) == 0
    assert seen[0] == "load" and seen[-1] == "save"
    steps = " ".join(seen[1:]).replace(" save", "").split(" optimizer")
    assert [s for s in steps if s.strip()] and len([s for s in steps if s.strip()]) == 2, seen
    for step in filter(str.strip, steps):
        phases = step.split()
        assert phases and len(phases) % 3 == 0, seen
        assert all(phases[i:i + 3] == ["forward", "loss", "backward"] for i in range(0, len(phases), 3)), seen
