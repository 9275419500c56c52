"""Before cloning to another GPU: for every catalog image, whether it runs on that GPU and driver, and why not.

The verdicts are ``Catalog.runs_on``'s (builder/catalog.py); this module names the GPU and ranks the images.
"""

from __future__ import annotations

from typing import Any

from builder import compat
from builder.catalog import DOES_NOT_RUN, RUNS, RUNS_WITHOUT_FLASH_ATTN, Catalog, ImageVerdict
from builder.environment import Capability
from builder.errors import SameboxError
from builder.spec import ImageSpec


def gpu_info(name: str) -> tuple[Capability, str]:
    """(compute capability, canonical name) for a GPU name as users see it, or a SameboxError listing names."""
    found = compat.gpu_capability(name)
    if found is None:
        known = ", ".join(sorted({canon for _, canon in compat.GPU_CAPABILITY.values()}))
        raise SameboxError(f"unknown GPU {name!r}",
                           f"use a name like 'RTX 4090', '4090D', 'A800', 'H20', 'vGPU-32GB'; known: {known}")
    return Capability.parse(found[0]), found[1]


def _rank(v: ImageVerdict, spec: ImageSpec) -> tuple[Any, ...]:
    order = {RUNS: 2, RUNS_WITHOUT_FLASH_ATTN: 1, DOES_NOT_RUN: 0}[v.verdict]
    return (order, spec.has_torch, compat.version_tuple(spec.torch) if spec.has_torch else (),
            compat.version_tuple(spec.cuda) if spec.has_torch else (), compat.version_tuple(spec.python))


def check_gpu(name: str, catalog: Catalog, driver: str = "") -> dict[str, Any]:
    """{'gpu', 'compute_capability', 'driver', 'images': [verdict...], 'best': image id or None}. The best image
    is the newest torch among those that run fully, else among those that run without flash-attn."""
    cc, canonical = gpu_info(name)
    if driver and not compat.version_tuple(driver):
        raise SameboxError(f"driver {driver!r} is not a version", "give it as nvidia-smi shows it, e.g. 550.54.14")
    verdicts = [catalog.runs_on(spec, cc, driver, canonical) for spec in catalog.images]
    ranked = sorted(zip(verdicts, catalog.images, strict=True), key=lambda vs: _rank(*vs), reverse=True)
    best = ranked[0][0].image if ranked and ranked[0][0].verdict != DOES_NOT_RUN else None
    return {
        "best": best,
        "compute_capability": str(cc),
        "driver": driver or None,
        "gpu": canonical,
        "images": [v.to_dict() for v in verdicts],
    }
