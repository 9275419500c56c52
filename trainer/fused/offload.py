"""Where the fused layers keep what their backward pass needs: each layer's input and its mid-layer residual.

Those two (tokens x hidden) tensors per layer are all a checkpointed layer keeps, and on a long micro-batch they
add up (7B, 28 layers, 32k tokens: 12.8 GB). With offloading they go to pinned host memory on a side stream while
the next layers compute, and come back one layer ahead of the backward pass that needs them, so the GPU holds a
single layer's worth. The copies overlap compute: a 7B forward over 32k tokens takes about a second, its 6.4 GB
of copies about a quarter of that over PCIe 4.0. Where the copies are slower than the compute (a small model, short
rows, a slow bus), the tensors wait on the GPU until their copy is done; at most IN_FLIGHT layers' copies are
queued before the forward pass waits for the oldest, so the GPU holds a few layers' worth, not every layer's.
"""

from __future__ import annotations

import collections
import contextlib

import torch

from builder.core import settings

IN_FLIGHT = 2  # layers whose copies to the host may run at once ($SAMEBOX_OFFLOAD_IN_FLIGHT for diagnosis)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown: then nothing is offloaded)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ActivationStore:
    """Saved tensors of the layers of one forward pass, by layer index; offloaded to the host when asked."""

    def __init__(self, device: torch.device, offload: bool) -> None:
        self.device = device
        self.offload = offload
        self.kept: dict[int, tuple[torch.Tensor, ...]] = {}
        self.host: dict[tuple[int, int], torch.Tensor] = {}  # (layer, slot) -> flat host buffer, reused
        self.meta: dict[int, list[tuple[torch.Size, torch.dtype]]] = {}
        self.ready: dict[int, tuple[tuple[torch.Tensor, ...], object]] = {}
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda and offload else None
        self.pin = cuda and offload and settings.pin_memory()
        limit = settings.offload_in_flight()
        self.in_flight_limit = IN_FLIGHT if limit is None else limit  # 0: no bound
        self.in_flight: collections.deque = collections.deque()  # events of queued copies to the host, oldest first
        self.waits = 0  # how often the forward pass waited for a copy

    # ----- forward -----------------------------------------------------------------------------------------
    def save(self, layer: int, *tensors: torch.Tensor) -> None:
        if not self.offload:
            self.kept[layer] = tensors
            return
        self.meta[layer] = [(t.shape, t.dtype) for t in tensors]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            for slot, t in enumerate(tensors):
                buf = self._buffer(layer, slot, t)
                buf[: t.numel()].copy_(t.reshape(-1), non_blocking=True)
                if self.stream is not None:
                    t.record_stream(self.stream)  # t may be freed on the compute stream while the copy runs
        if self.stream is not None:
            self._bound_in_flight()

    def _bound_in_flight(self) -> None:
        """The tensors of a queued copy stay allocated until it ends: past the limit, wait for the oldest copy
        (the host waits; the GPU still has the layers queued since then to compute)."""
        event = torch.cuda.Event()
        event.record(self.stream)
        self.in_flight.append(event)
        while self.in_flight_limit and len(self.in_flight) > self.in_flight_limit:
            oldest = self.in_flight.popleft()
            if not oldest.query():
                self.waits += 1
                oldest.synchronize()

    def _buffer(self, layer: int, slot: int, t: torch.Tensor) -> torch.Tensor:
        buf = self.host.get((layer, slot))
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            # 25% headroom: the next micro-batch is rarely the same length; re-pinning costs more than spare RAM.
            size = t.numel() + t.numel() // 4
            buf = torch.empty(size, dtype=t.dtype, pin_memory=self.pin)
            self.host[(layer, slot)] = buf
        return buf

    # ----- backward ----------------------------------------------------------------------------------------
    def prefetch(self, layer: int) -> None:
        """Start bringing ``layer``'s tensors back (no-op when kept on the device or already on its way)."""
        if not self.offload or layer in self.ready or layer not in self.meta:
            return
        outs = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.meta[layer])
        event = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            for slot, out in enumerate(outs):
                out.view(-1).copy_(self.host[(layer, slot)][: out.numel()], non_blocking=True)
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.ready[layer] = (outs, event)

    def load(self, layer: int) -> tuple[torch.Tensor, ...]:
        if not self.offload:
            return self.kept.pop(layer)
        self.prefetch(layer)
        outs, event = self.ready.pop(layer)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)  # type: ignore[arg-type]
        return outs

    def _on_side(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def clear(self) -> None:
        """Drop what a pass left behind (a pass that failed half way, e.g. out of memory); host buffers stay."""
        self.kept.clear()
        self.ready.clear()
        self.in_flight.clear()
        self.meta.clear()

    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.host.values())
