"""Identity and compatibility checks: is there a GPU, is the driver new enough for torch's CUDA, does torch
carry kernels for this GPU, MIG, and memory other processes already hold."""

from __future__ import annotations

from typing import Any

from builder.core import compat
from builder.core.catalog import Catalog
from builder.core.environment import Capability
from builder.core.errors import SameboxError
from builder.selftest.findings import Finding, fail, gib, na, nvml_devices, ok, warn
from builder.selftest.probes import NVML, TORCH

OTHER_PROCESS_WARN_BYTES = 2**30


def images_that_run(capability: Capability | None, driver: str | None) -> list[str]:
    """Catalog images whose torch has SASS for ``capability`` and whose CUDA ``driver`` supports."""
    try:
        return Catalog.load().images_that_run(capability, driver or "")
    except SameboxError:
        return []


def _image_hint(capability: Capability | None, driver: str | None) -> str:
    images = images_that_run(capability, driver)
    if not images:
        return "no catalog image fits this machine; add one to images/matrix.toml (see `samebox images`)"
    return f"use catalog image {images[-1]} (fits here: {', '.join(images)}; see `samebox images`)"


def nvidia_driver(r: dict[str, Any]) -> Finding:
    """A GPU, a driver, and a CUDA build of torch that sees it: everything else on the GPU depends on this."""
    nvml, torch = r.get(NVML.name) or {}, r.get(TORCH.name) or {}
    if not nvml.get("available"):
        if nvml.get("kind") == "no_pynvml":
            return fail(f"cannot query the GPU: {nvml.get('error')}", "pip install nvidia-ml-py (it is in the lock)")
        return fail(
            f"no NVIDIA driver / GPU: NVML says {nvml.get('error') or 'unavailable'!r}",
            "run on a GPU instance (AutoDL: start the instance with its GPU, not in no-GPU mode); "
            "`nvidia-smi` must list a GPU; in Docker pass --gpus all with the NVIDIA container toolkit",
        )
    if not nvml.get("device_count"):
        return fail(
            "the NVIDIA driver is loaded but lists no GPU", "check `nvidia-smi`; the instance may have lost its GPU"
        )
    if not torch.get("available"):
        return fail(
            f"torch is not importable: {torch.get('error')}", "install the environment: samebox setup / the image"
        )
    if not str(torch.get("cuda") or ""):
        return fail(
            f"torch {torch.get('version')} is a CPU-only build",
            "use the platform's CUDA torch (the setup script never replaces it); " + _image_hint(None, None),
        )
    if not torch.get("cuda_available") or not torch.get("device_count"):
        visible = (r.get("process") or {}).get("cuda_visible_devices")
        if visible is not None:
            return fail(
                f"the driver lists {nvml['device_count']} GPU(s) but CUDA sees none: CUDA_VISIBLE_DEVICES={visible!r}",
                "unset CUDA_VISIBLE_DEVICES or set it to the GPU indices to use (e.g. CUDA_VISIBLE_DEVICES=0)",
            )
        return fail(
            f"the driver lists {nvml['device_count']} GPU(s) but torch {torch.get('version')} cannot use them",
            "compare the driver's CUDA with torch's (driver_cuda finding); "
            "`python -c 'import torch; torch.cuda.init()'` shows CUDA's own error",
        )
    names = ", ".join(sorted({d["name"] for d in nvml["devices"]}))
    return ok(
        f"{nvml['device_count']} x {names}; driver {nvml['driver_version']} (CUDA {nvml['cuda_driver_version']}); "
        f"torch {torch['version']} sees {torch['device_count']}"
    )


def driver_cuda(r: dict[str, Any]) -> Finding:
    nvml, torch = r.get(NVML.name) or {}, r.get(TORCH.name) or {}
    cuda = torch.get("cuda")
    if not nvml.get("available") or not cuda:
        return na("needs the NVIDIA driver and a CUDA build of torch", "see the nvidia_driver finding")
    driver = nvml["driver_version"]
    if compat.driver_supports(driver, cuda):
        return ok(f"driver {driver} (up to CUDA {nvml['cuda_driver_version']}) runs torch's CUDA {cuda}")
    need = compat.min_driver(cuda)
    return fail(
        f"driver {driver} is too old for torch's CUDA {cuda} (needs >= {need})",
        f"upgrade the driver to >= {need}, or {_image_hint(None, driver)}",
    )


def gpu_arch(r: dict[str, Any]) -> list[Finding]:
    torch = r.get(TORCH.name) or {}
    devices = nvml_devices(r)
    if not devices or not torch.get("cuda"):
        return [na("needs the NVIDIA driver and a CUDA build of torch", "see the nvidia_driver finding")]
    arch_list = torch.get("arch_list") or []
    if not torch.get("cuda_available") and not arch_list:
        # torch reports its architectures only once CUDA starts: hidden or broken GPUs leave nothing to compare.
        return [na("torch sees no CUDA device, so its GPU architectures are unknown", "see the nvidia_driver finding")]
    built = sorted({Capability.parse(a) for a in arch_list if a.startswith("sm_")})
    ptx = sorted({Capability.parse(a) for a in arch_list if a.startswith("compute_")})
    found = []
    for d in devices:
        cc = d.get("compute_capability")
        if not cc:
            found.append(na(f"GPU {d['index']} {d['name']}: compute capability unknown"))
            continue
        cap = Capability.parse(cc)
        sass = [b for b in built if cap.runs(b)]
        jit = [p for p in ptx if p <= cap]
        label = f"GPU {d['index']} {d['name']} is {cap.sm}"
        if sass:
            found.append(ok(f"{label}; torch {torch.get('version')} has SASS for {sass[-1].sm}"))
        elif jit:
            found.append(
                warn(
                    f"{label}; torch has only PTX (compute_{jit[-1].digits}) for it: slow first start, JIT",
                    _image_hint(cap, (r.get(NVML.name) or {}).get("driver_version")),
                )
            )
        else:
            sms = ", ".join(b.sm for b in built) or "sm_?"
            found.append(
                fail(
                    f"{label} but torch {torch.get('version')} is built for {sms}: "
                    "'no kernel image is available'",
                    _image_hint(cap, (r.get(NVML.name) or {}).get("driver_version")),
                )
            )
    return found


def mig(r: dict[str, Any]) -> list[Finding]:
    devices = nvml_devices(r)
    if not devices:
        return [na("no GPU to query", "see the nvidia_driver finding")]
    found = []
    for d in devices:
        mode = d.get("mig_mode")
        if mode is None:
            found.append(na(f"GPU {d['index']}: MIG is not supported on {d['name']}"))
        elif mode[0]:
            found.append(
                warn(
                    f"GPU {d['index']}: MIG is on; a job sees one slice, not the whole GPU",
                    "ask for a whole GPU, or `nvidia-smi -i N -mig 0` as root (needs a GPU reset)",
                )
            )
        else:
            found.append(ok(f"GPU {d['index']}: MIG off"))
    return found


def memory_in_use(r: dict[str, Any]) -> list[Finding]:
    devices = nvml_devices(r)
    if not devices:
        return [na("no GPU to query", "see the nvidia_driver finding")]
    own = (r.get("process") or {}).get("pid")
    found = []
    for d in devices:
        procs = d.get("processes")
        mem = d.get("memory") or {}
        if procs is None:
            found.append(na(f"GPU {d['index']}: the driver does not list its processes"))
            continue
        others = [p for p in procs if p["pid"] != own]
        held = sum(p["used_memory"] for p in others)
        if others and held >= OTHER_PROCESS_WARN_BYTES:
            pids = ", ".join(f"{p['pid']} ({gib(p['used_memory'])})" for p in others)
            found.append(
                warn(
                    f"GPU {d['index']}: other processes hold {gib(held)}: {pids}",
                    "stop them (`nvidia-smi` lists them) or expect less memory for the job",
                )
            )
        else:
            found.append(
                ok(
                    f"GPU {d['index']}: {gib(mem.get('free', 0))} free of {gib(mem.get('total', 0))}, "
                    f"{len(others)} other process(es)"
                )
            )
    return found
