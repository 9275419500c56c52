"""The collector: runs the probes a mode's checks name (registry.probes_for), each once, on the schedule of
probes.py's stages, and returns their readings as one JSON-ready dict, each under its probe's name.

Checks never query the machine; they judge this dict. The same dict is what bench/selftest_gpu.py --capture
records as test fixtures, so every decision runs in CI on readings taken from a real GPU machine.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from builder.core.attention_needs import AttentionNeeds
from builder.core.lazy_compile import compile_on_first_call
from builder.selftest import allreduce, gpu_probes
from builder.selftest.probes import (
    ACCURACY,
    AFTER,
    ENVIRONMENT,
    IDENTITY,
    KERNEL,
    KERNELS,
    MEMORY,
    NOT_NEEDED,
    TIMED,
    TORCH,
    Probe,
    ProbeContext,
)
from builder.selftest.registry import probes_for

# 2: every reading at the top level under its probe's name (1 nested them under "gpu" and "env").
READINGS_VERSION = 2


def _probe(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """Runs one probe; an exception becomes ``{"probe_error": ...}`` (the checks judge it), never a traceback."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        return {
            "probe_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "where": traceback.format_exc(limit=-2).splitlines()[-3:],
        }
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _import_quietly(module: str) -> None:
    with contextlib.suppress(Exception):  # the probe imports it again and records why it fails
        importlib.import_module(module)


def _importing(timings: dict[str, float], modules: list[str]) -> dict[str, Callable[[], Any]]:
    """The job's kernel libraries imported one after another on one thread, started now, in the kernel probes'
    order; each value waits for its module. One thread, not one per library: two threads importing libraries that
    both import torch._dynamo saw it half-initialised ("partially initialized module 'torch._dynamo'") and failed
    the flash-attn and bitsandbytes probes of a healthy machine."""
    order = list(dict.fromkeys(modules))
    done = {m: threading.Event() for m in order}

    def run() -> None:
        try:
            with compile_on_first_call():  # bitsandbytes' import would otherwise import TorchInductor (seconds)
                for m in order:
                    try:
                        _probe(timings, f"import_{m}", lambda m=m: _import_quietly(m))
                    finally:
                        done[m].set()
        finally:  # an import that raised BaseException (SystemExit) must not leave a waiter hanging
            for event in done.values():
                event.set()

    if order:
        threading.Thread(target=run, daemon=True).start()
    return {m: done[m].wait for m in order}


def _in_background(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Starts ``fn`` on a thread now; the returned function waits for it and gives its result. The collector uses
    it for work that mostly waits (imports while the GPU computes, disk writes, reading package metadata)."""
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=_probe(timings, name, fn)), daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        return box.get("result")

    return result


def collect(
    mode: str,
    needs: AttentionNeeds,
    data_dir: str | None = None,
    lockfile: str | None = None,
    flash_attn_extension: str | None = None,
    kernels: tuple[str, ...] = KERNELS,
) -> dict[str, Any]:
    """Everything ``mode``'s checks judge ('quick' or 'full'), one reading per probe (registry.probes_for) under
    the probe's name; ``kernels``: which of KERNELS the job uses (the others are not imported and read
    NOT_NEEDED). Without a usable CUDA GPU only the identity and environment probes run.

    Independent work overlaps: once torch is in, the kernel libraries import on a thread (seconds of Python, while
    the GPU computes: the load queues a second of matmuls per sync, so a thread holding the GIL cannot starve it);
    the quick environment probes run on another thread beside the accuracy probe; the processes of a multi-GPU
    all-reduce start before the load and wait for it to end. Nothing else touches the GPU while its speed is
    measured.
    """
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {KERNELS}")
    plan = probes_for(mode)
    timings: dict[str, float] = {}
    r: dict[str, Any] = {
        "readings_version": READINGS_VERSION,
        "mode": mode,
        "model": needs.to_dict(),
        "kernels": list(kernels),
        "timings": timings,
        "process": {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
    }
    context = ProbeContext(mode, needs, data_dir, lockfile, flash_attn_extension, kernels)
    _run_stage(r, timings, context, plan, IDENTITY)
    torch = r[TORCH.name] if isinstance(r[TORCH.name], dict) else {}
    context = replace(context, torch_version=torch.get("version"), device_count=torch.get("device_count") or 0)

    def environment() -> dict[str, Any]:
        return _run_stage({}, timings, context, plan, ENVIRONMENT)

    # Quick: the environment probes (a disk write, package metadata) beside the accuracy probe. Full hashes every
    # installed file (seconds of CPU): beside the memory pattern and the kernels, after the GPU's speed is measured.
    env = _in_background(timings, "env", environment) if mode == "quick" else None
    if not torch.get("cuda_available"):  # no CUDA device: the GPU checks report why from the nvml/torch readings
        r.update(env() if env else environment())
        return r
    # Each kernel library imports torch first: its thread starts once torch is in (no GPU: none starts at all).
    needed = [p for p in plan if p.kernel is None or p.kernel in kernels]
    imported = _importing(timings, [m for p in needed for m in p.imports])
    if allreduce.under_torchrun():
        _probe(timings, "set_device", gpu_probes.use_local_rank)  # each rank tests its own GPU
    started = {p.name: p.read(context) for p in needed if p.early}
    _run_stage(r, timings, context, plan, ACCURACY)
    if env:
        r.update(env())
    _run_stage(r, timings, context, plan, TIMED, started)
    env = env or _in_background(timings, "env", environment)
    _run_stage(r, timings, context, plan, MEMORY)
    if mode == "full":  # full's probes import more (Liger) themselves: not while the import thread still runs
        for wait in imported.values():
            wait()
    for p in (p for p in plan if p.stage == KERNEL):
        if p.kernel is not None and p.kernel not in kernels:
            r[p.name] = dict(NOT_NEEDED)
            continue
        for module in p.imports:
            imported[module]()
        r[p.name] = _probe(timings, p.name, lambda p=p: p.read(context))
    # NVML again after the load: ECC counters and remapped rows may have moved while the GPU worked.
    _run_stage(r, timings, context, plan, AFTER)
    r.update(env())
    return r


def _run_stage(r: dict[str, Any], timings: dict[str, float], context: ProbeContext, plan: tuple[Probe, ...],
               stage: str, started: dict[str, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Runs the planned probes of one stage, one after another, into ``r``; an early probe's reading is taken
    from what it ``started``."""
    started = started or {}
    for p in plan:
        if p.stage == stage:
            r[p.name] = _probe(timings, p.name, started.get(p.name) or (lambda p=p: p.read(context)))
    return r
