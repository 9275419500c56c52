"""The all-reduce probe: one all-reduce across every GPU -> a plain reading (sum right?, bus bandwidth, or how it
failed). Run as one process per local GPU (torch.multiprocessing), or, under torchrun, across the launcher's ranks
and nodes with its process group. A run that misses its deadline becomes a reading (``timed_out``), never a hung
self-test: a hanging NCCL is exactly what this probe is for."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

# NVLink multicast (NVLS) stays off in what the probe starts, unless the user chose otherwise.
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0"}
# The NCCL settings that change the transport; the reading records the ones in effect.
NCCL_ENV = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NVLS_ENABLE", "NCCL_P2P_LEVEL")
WARMUP = 3
# A spawned rank waits this long at most for the go signal (its parent died otherwise).
START_WAIT_S = 600.0
GO_FILE = "go"


def nccl_env() -> dict[str, str]:
    """The NCCL settings of this process that change the transport."""
    return {k: os.environ[k] for k in NCCL_ENV if k in os.environ}


def _sync(tensor: Any) -> None:
    import torch

    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def measure(dist: Any, tensor: Any, rank: int, world: int, iters: int) -> dict[str, Any]:
    """On every rank of an initialised process group: rank r contributes r+1 everywhere, so each element of the
    sum is world*(world+1)/2 (exact in float32); then ``iters`` timed all-reduces (nccl-tests' algbw and busbw)."""
    tensor.fill_(rank + 1)
    dist.all_reduce(tensor)
    _sync(tensor)
    expected = world * (world + 1) / 2
    wrong = int((tensor != expected).sum().item())
    tensor.zero_()  # timed sums of zeros stay finite however many iterations run
    for _ in range(WARMUP):
        dist.all_reduce(tensor)
    _sync(tensor)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    _sync(tensor)
    seconds = (time.perf_counter() - start) / iters
    size = tensor.numel() * tensor.element_size()
    algbw = size / seconds / 1e9
    return {
        "rank": rank,
        "expected": expected,
        "wrong_elements": wrong,
        "seconds_per_allreduce": seconds,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2 * (world - 1) / world,
    }


def _tensor(backend: str, size_mib: float, device_index: int | None) -> Any:
    import torch

    numel = int(size_mib * 2**20) // 4
    if backend == "nccl":
        torch.cuda.set_device(device_index if device_index is not None else torch.cuda.current_device())
        return torch.empty(numel, device="cuda", dtype=torch.float32)
    return torch.empty(numel, dtype=torch.float32)


def _spawned_rank(
    rank: int, world: int, backend: str, rendezvous: str, size_mib: float, iters: int, timeout_s: float
) -> None:
    """One process of the local run (torch.multiprocessing target): imports torch at once, touches no GPU until the
    parent writes the go file, then writes rank<r>.json into ``rendezvous``."""
    for key, value in NCCL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import torch.distributed as dist

    out = Path(rendezvous) / f"rank{rank}.json"
    waited = time.perf_counter()
    while not (Path(rendezvous) / GO_FILE).exists():
        if time.perf_counter() - waited > START_WAIT_S:
            return
        time.sleep(0.01)
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{rendezvous}/store",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        result = measure(dist, _tensor(backend, size_mib, rank), rank, world, iters)
        result["nccl_env"] = nccl_env()
        dist.destroy_process_group()
    except Exception as e:
        result = {"rank": rank, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out.write_text(json.dumps(result))


def _reading(world: int, backend: str, launcher: str, size_mib: float, iters: int, timeout_s: float) -> dict:
    return {
        "world_size": world,
        "backend": backend,
        "launcher": launcher,
        "bytes": int(size_mib * 2**20) // 4 * 4,
        "iters": iters,
        "timeout_s": timeout_s,
        "nccl_env": {**{k: v for k, v in NCCL_DEFAULTS.items() if launcher != "torchrun"}, **nccl_env()},
        "timed_out": False,
    }


def _merge(reading: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's speed, every rank's sum and errors."""
    reading["ranks_reported"] = sorted(r["rank"] for r in ranks)
    errors = [f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r]
    if errors:
        reading["error"] = "; ".join(errors)
    measured = [r for r in ranks if "error" not in r]
    if measured:
        reading["expected"] = measured[0]["expected"]
        reading["wrong_elements"] = max(r["wrong_elements"] for r in measured)
        first = min(measured, key=lambda r: r["rank"])
        for key in ("seconds_per_allreduce", "algbw_gbps", "busbw_gbps", "nccl_env"):
            if key in first:
                reading[key] = first[key]
    return reading


class LocalAllreduce:
    """The run across the local GPUs in two steps: ``start()`` spawns one process per GPU (with a file rendezvous),
    which imports Python and torch (seconds) while the GPU serves other probes; ``run()`` lets them measure and
    collects the reading. Processes still running at the deadline (counted from ``run()``) are killed and the
    reading says ``timed_out``."""

    def __init__(self, world: int, backend: str = "nccl", size_mib: float = 256, iters: int = 20,
                 timeout_s: float = 60) -> None:
        self.world, self.backend, self.size_mib, self.iters, self.timeout_s = world, backend, size_mib, iters, timeout_s
        self.rendezvous: tempfile.TemporaryDirectory[str] | None = None
        self.context: Any = None

    def start(self) -> LocalAllreduce:
        import torch.multiprocessing as mp

        self.rendezvous = tempfile.TemporaryDirectory(prefix="samebox-allreduce-")
        try:
            self.context = mp.start_processes(
                _spawned_rank,
                args=(self.world, self.backend, self.rendezvous.name, self.size_mib, self.iters, self.timeout_s),
                nprocs=self.world,
                join=False,
                start_method="spawn",
            )
        except BaseException:
            self.rendezvous.cleanup()
            raise
        return self

    def run(self) -> dict[str, Any]:
        import torch.multiprocessing as mp

        if self.context is None:
            self.start()
        assert self.rendezvous is not None
        reading = _reading(self.world, self.backend, "torch.multiprocessing", self.size_mib, self.iters,
                           self.timeout_s)
        rendezvous = Path(self.rendezvous.name)
        (rendezvous / GO_FILE).touch()
        start = time.perf_counter()
        try:
            while not self.context.join(timeout=max(0.05, start + self.timeout_s - time.perf_counter())):
                if time.perf_counter() >= start + self.timeout_s:
                    reading["timed_out"] = True
                    break
        except mp.ProcessException as e:  # a rank died without writing its result (a crash in NCCL or CUDA)
            reading["error"] = str(e).strip().splitlines()[0]
        finally:
            for process in self.context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            ranks = [json.loads(p.read_text()) for p in sorted(rendezvous.glob("rank*.json"))]
            self.rendezvous.cleanup()
        reading["elapsed_s"] = round(time.perf_counter() - start, 3)
        return _merge(reading, ranks) if ranks else reading


def local_allreduce(
    world: int, backend: str = "nccl", size_mib: float = 256, iters: int = 20, timeout_s: float = 60
) -> dict[str, Any]:
    """One process per local GPU (CPU processes for gloo), started by torch.multiprocessing, measured at once."""
    return LocalAllreduce(world, backend, size_mib, iters, timeout_s).start().run()


def torchrun_allreduce(
    backend: str | None = None, size_mib: float = 256, iters: int = 20, timeout_s: float = 60
) -> dict[str, Any]:
    """Across the ranks (and nodes) of torchrun's process group: the one already initialised, else one made
    from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Every rank must call this. The collective
    runs on a worker thread so that a hang returns ``timed_out`` on this rank instead of freezing it."""
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        for key, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)  # this rank is the process NCCL starts in
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    reading = _reading(world, backend, "torchrun", size_mib, iters, timeout_s)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    reading["nodes"] = max(1, world // max(local, 1))
    results: list[dict[str, Any]] = []

    def run() -> None:
        try:
            device = int(os.environ.get("LOCAL_RANK", 0))
            results.append(
                {**measure(dist, _tensor(backend, size_mib, device), rank, world, iters), "nccl_env": nccl_env()}
            )
        except Exception as e:
            results.append({"rank": rank, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(-1)})

    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    reading["elapsed_s"] = round(time.perf_counter() - start, 3)
    if worker.is_alive():
        reading["timed_out"] = True
        return reading  # the process group is stuck: leave it, the job cannot use it either
    if created:
        dist.destroy_process_group()
    return _merge(reading, results)


def under_torchrun() -> bool:
    """Started by torchrun (or another launcher that sets the same variables) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def prepare(device_count: int, timeout_s: float = 60, iters: int = 20) -> Callable[[], dict[str, Any]]:
    """The probe the collector runs, set going now where that saves time: across local GPUs the processes start
    at once (they touch no GPU until the returned function is called). Across torchrun's ranks, else the local
    GPUs; one GPU: nothing to reduce across (``world_size`` 1). A failure to start is raised by the call."""
    if under_torchrun():
        return lambda: torchrun_allreduce(timeout_s=timeout_s, iters=iters)
    if device_count < 2:
        return lambda: {"world_size": device_count}
    run = LocalAllreduce(device_count, "nccl", timeout_s=timeout_s, iters=iters)
    with contextlib.suppress(Exception):  # run() starts it again, and the probe records why that fails
        run.start()
    return run.run


def allreduce(device_count: int, timeout_s: float = 60, iters: int = 20) -> dict[str, Any]:
    return prepare(device_count, timeout_s, iters)()
