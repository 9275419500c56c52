"""Before cloning to another GPU: for every catalog image, whether it runs on that GPU and driver, and why not.

Every fact comes from builder/compat.py: the compute capability of the GPU, the architectures compiled into
torch's wheels for each CUDA, the minimum driver for each CUDA, flash-attn 2's minimum capability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from builder import compat
from builder.errors import SameboxError
from builder.spec import ImageSpec

RUNS = "runs"
RUNS_WITHOUT_FLASH_ATTN = "runs without flash-attn"
DOES_NOT_RUN = "does not run"


@dataclass(frozen=True)
class ImageVerdict:
    image: str
    torch: str
    cuda: str
    verdict: str  # RUNS, RUNS_WITHOUT_FLASH_ATTN or DOES_NOT_RUN
    reasons: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def gpu_info(name: str) -> tuple[str, str]:
    """(compute capability, canonical name) for a GPU name as users see it, or a SameboxError listing names."""
    found = compat.gpu_capability(name)
    if found is None:
        known = ", ".join(sorted({canon for _, canon in compat.GPU_CAPABILITY.values()}))
        raise SameboxError(f"unknown GPU {name!r}",
                           f"use a name like 'RTX 4090', '4090D', 'A800', 'H20', 'vGPU-32GB'; known: {known}")
    return found


def _arch_list(archs: tuple[str, ...]) -> str:
    return " ".join("sm_" + a.replace(".", "") for a in archs)


def check_image(spec: ImageSpec, cc: str, gpu: str, driver: str = "") -> ImageVerdict:
    """Whether one image runs on a GPU of compute capability ``cc`` (with ``driver``, when given)."""
    fatal: list[str] = []
    limits: list[str] = []
    if spec.has_torch:
        built = compat.TORCH_ARCHES.get(spec.cuda, ())
        if not any(compat.arch_runs_on(a, cc) for a in built):
            fixes = sorted((c for c, a in compat.TORCH_ARCHES.items() if any(compat.arch_runs_on(x, cc) for x in a)),
                           key=compat.version_tuple)
            fatal.append(f"{gpu} is sm_{cc.replace('.', '')}, not in torch {spec.torch}'s CUDA {spec.cuda} build "
                         f"({_arch_list(built)}): 'no kernel image is available'"
                         + (f"; torch's CUDA {', '.join(fixes)} builds have it" if fixes else ""))
        if driver and not compat.driver_supports(driver, spec.cuda):
            fatal.append(f"driver {driver} is older than CUDA {spec.cuda} needs ({compat.min_driver(spec.cuda)})")
    if compat.version_tuple(cc) < compat.version_tuple(compat.FLASH_ATTN2_MIN_CAPABILITY):
        limits.append(f"flash-attn 2 needs sm_{compat.FLASH_ATTN2_MIN_CAPABILITY.replace('.', '')}+ "
                      f"(Ampere or newer); {gpu} is sm_{cc.replace('.', '')}: use sdpa attention")
    elif spec.has_torch and not any(compat.arch_runs_on(a, cc) for a in spec.archs):
        limits.append(f"this image's flash-attn is built for {_arch_list(spec.archs)}, not {gpu}'s "
                      f"sm_{cc.replace('.', '')}: use sdpa attention")
    if compat.version_tuple(cc) < compat.version_tuple(compat.BF16_MIN_CAPABILITY):
        limits.append(f"no bf16 on sm_{cc.replace('.', '')}: train in fp16")
    if fatal:
        return ImageVerdict(spec.id, spec.torch_full, spec.cuda, DOES_NOT_RUN, tuple(fatal))
    return ImageVerdict(spec.id, spec.torch_full, spec.cuda, RUNS_WITHOUT_FLASH_ATTN if limits else RUNS, tuple(limits))


def _rank(v: ImageVerdict, spec: ImageSpec) -> tuple[Any, ...]:
    order = {RUNS: 2, RUNS_WITHOUT_FLASH_ATTN: 1, DOES_NOT_RUN: 0}[v.verdict]
    return (order, spec.has_torch, compat.version_tuple(spec.torch) if spec.has_torch else (),
            compat.version_tuple(spec.cuda) if spec.has_torch else (), compat.version_tuple(spec.python))


def check_gpu(name: str, catalog: list[ImageSpec], driver: str = "") -> dict[str, Any]:
    """{'gpu', 'compute_capability', 'driver', 'images': [verdict...], 'best': image id or None}. The best image
    is the newest torch among those that run fully, else among those that run without flash-attn."""
    cc, canonical = gpu_info(name)
    if driver and not compat.version_tuple(driver):
        raise SameboxError(f"driver {driver!r} is not a version", "give it as nvidia-smi shows it, e.g. 550.54.14")
    verdicts = [check_image(spec, cc, canonical, driver) for spec in catalog]
    ranked = sorted(zip(verdicts, catalog, strict=True), key=lambda vs: _rank(*vs), reverse=True)
    best = ranked[0][0].image if ranked and ranked[0][0].verdict != DOES_NOT_RUN else None
    return {
        "best": best,
        "compute_capability": cc,
        "driver": driver or None,
        "gpu": canonical,
        "images": [v.to_dict() for v in verdicts],
    }
