"""Interconnect check: the all-reduce across GPUs (or torchrun's ranks) returned the right sum, finished before its
deadline, and reached the bus bandwidth that its topology (NVLink or PCIe, from NVML) should give."""

from __future__ import annotations

from typing import Any

from builder.core import compat
from builder.selftest.findings import (
    Finding,
    fail,
    gpu_reading,
    gpu_usable,
    na,
    no_gpu,
    nvml_devices,
    ok,
    probe_error,
    warn,
)
from builder.selftest.probes import ALLREDUCE

BUSBW_WARN_RATIO = 0.5

P2P_OFF = (
    "GeForce cards: export NCCL_P2P_DISABLE=1 (peer-to-peer over PCIe is broken or slow on consumer cards: NCCL "
    "then goes through host memory) and rerun `samebox selftest`"
)
INSPECT = (
    "rerun with NCCL_DEBUG=INFO to see the transport NCCL picks and where it stops; `nvidia-smi topo -m` shows how "
    "the GPUs are linked"
)

SLOW_FIX = (
    f"{INSPECT}; GPUs of one job should share NVLink or one PCIe switch, and NCCL_P2P_DISABLE / NCCL_SHM_DISABLE "
    "should be unset"
)


def topology(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """How the GPUs talk, from NVML: NVLink when every GPU has an active link, else PCIe at the slowest link's
    generation; consumer cards (GeForce) flagged."""
    names = {d.get("name", "?") for d in devices}
    nvlink = bool(devices) and all((d.get("nvlink_active") or 0) > 0 for d in devices)
    gens = [d.get("pcie_max_gen") for d in devices if d.get("pcie_max_gen")]
    return {
        "link": "nvlink" if nvlink else "pcie",
        "pcie_gen": min(gens) if gens else None,
        "gpu": sorted(names)[0] if names else "?",
        "consumer": any("GEFORCE" in n.upper() for n in names),
    }


def reference_busbw(topo: dict[str, Any]) -> tuple[str, float] | None:
    """(table key, GB/s) from NCCL_BUSBW_GBPS for a topology, or None when the table has none."""
    if topo["link"] == "nvlink":
        name = compat.normalise_gpu_name(topo["gpu"])
        for known in sorted(
            (k[len("nvlink:") :] for k in compat.NCCL_BUSBW_GBPS if k.startswith("nvlink:")), key=len, reverse=True
        ):
            if name.startswith(known):
                return f"nvlink:{known}", compat.NCCL_BUSBW_GBPS[f"nvlink:{known}"]
        return None
    key = f"pcie:{topo['pcie_gen']}"
    return (key, compat.NCCL_BUSBW_GBPS[key]) if key in compat.NCCL_BUSBW_GBPS else None


def _stuck_fix(topo: dict[str, Any], p2p_disabled: bool) -> str:
    if topo["consumer"] and not p2p_disabled:
        return P2P_OFF
    return f"{INSPECT}; on a rented instance move to another machine"


def allreduce(r: dict[str, Any]) -> list[Finding]:
    reading = gpu_reading(r, ALLREDUCE)
    if reading is None:
        return [no_gpu() if not gpu_usable(r) else na("the all-reduce probe did not run")]
    err = probe_error(reading)
    if err:
        return [fail(f"the all-reduce probe crashed: {err}", INSPECT)]
    world = reading.get("world_size") or 0
    if world < 2:
        return [na(f"{world} GPU: no all-reduce across GPUs to test")]
    topo = topology(nvml_devices(r))
    p2p_disabled = (reading.get("nccl_env") or {}).get("NCCL_P2P_DISABLE") == "1"
    across = f"{reading.get('backend')} all-reduce across {world} ranks ({reading.get('launcher')})"
    if reading.get("error"):
        return [fail(f"{across} failed: {reading['error']}", _stuck_fix(topo, p2p_disabled))]
    if reading.get("timed_out"):
        return [
            fail(
                f"{across} did not finish in {reading.get('timeout_s') or 0:.0f} s: a hang "
                f"(ranks that reported: {reading.get('ranks_reported', [])})",
                _stuck_fix(topo, p2p_disabled),
            )
        ]
    wrong = reading.get("wrong_elements")
    if wrong is None or wrong:
        return [
            fail(
                f"{across} returned a wrong sum in {wrong} of {reading['bytes'] // 4} elements "
                f"(expected {reading.get('expected')})",
                (P2P_OFF + "; if it stays wrong, " if topo["consumer"] and not p2p_disabled else "")
                + "the interconnect corrupts data: do not train across these GPUs; on a rented instance move to "
                "another machine",
            )
        ]
    busbw = reading["busbw_gbps"]
    found = [ok(f"{across}: the sum is right on all {reading['bytes'] // 4} elements")]
    speed = f"{across}: bus bandwidth {busbw:.1f} GB/s over {reading['bytes'] / 2**20:.0f} MiB"
    if (reading.get("nodes") or 1) > 1:
        found.append(na(f"{speed}, across {reading['nodes']} nodes: no reference for the network between them"))
        return found
    ref = reference_busbw(topo)
    link = "NVLink" if topo["link"] == "nvlink" else f"PCIe gen{topo['pcie_gen'] or '?'}"
    if ref is None:
        found.append(
            na(f"{speed} ({link}); no reference for this topology",
               "add it to NCCL_BUSBW_GBPS in builder/core/compat.py")
        )
        return found
    key, expected = ref
    text = f"{speed}, {busbw / expected:.2f}x the {key} reference {expected:.0f} GB/s"
    if busbw < BUSBW_WARN_RATIO * expected:
        found.append(warn(text, _stuck_fix(topo, p2p_disabled) if topo["consumer"] else SLOW_FIX))
    else:
        found.append(ok(text))
    return found
