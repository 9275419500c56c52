"""Compatibility facts as data: GPUs, drivers, torch builds, flash-attn. The only place these numbers live.

Every function here is a lookup over the tables; callers never encode version knowledge of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- GPUs -------------------------------------------------------------------------------------------------------

# Marketing name (as users and the rental platforms write it, normalised by ``normalise_gpu_name``) ->
# (compute capability, canonical name). The vGPU rows are AutoDL's virtualised cards.
GPU_CAPABILITY: dict[str, tuple[str, str]] = {
    "V100": ("7.0", "Tesla V100"),
    "T4": ("7.5", "Tesla T4"),
    "2080TI": ("7.5", "GeForce RTX 2080 Ti"),
    "TITANRTX": ("7.5", "TITAN RTX"),
    "A100": ("8.0", "A100"),
    "A800": ("8.0", "A800"),
    "A30": ("8.0", "A30"),
    "3060": ("8.6", "GeForce RTX 3060"),
    "3080": ("8.6", "GeForce RTX 3080"),
    "3080TI": ("8.6", "GeForce RTX 3080 Ti"),
    "3090": ("8.6", "GeForce RTX 3090"),
    "A10": ("8.6", "A10"),
    "A40": ("8.6", "A40"),
    "A4000": ("8.6", "RTX A4000"),
    "A5000": ("8.6", "RTX A5000"),
    "A6000": ("8.6", "RTX A6000"),
    "4060": ("8.9", "GeForce RTX 4060"),
    "4070": ("8.9", "GeForce RTX 4070"),
    "4080": ("8.9", "GeForce RTX 4080"),
    "4090": ("8.9", "GeForce RTX 4090"),
    "4090D": ("8.9", "GeForce RTX 4090 D"),
    "L4": ("8.9", "L4"),
    "L20": ("8.9", "L20"),
    "L40": ("8.9", "L40"),
    "L40S": ("8.9", "L40S"),
    "VGPU": ("8.9", "vGPU (AutoDL, RTX 4090 class)"),
    "H20": ("9.0", "H20"),
    "H100": ("9.0", "H100"),
    "H800": ("9.0", "H800"),
    "H200": ("9.0", "H200"),
    "GH200": ("9.0", "GH200"),
    "B200": ("10.0", "B200"),
    "5080": ("12.0", "GeForce RTX 5080"),
    "5090": ("12.0", "GeForce RTX 5090"),
    "5090D": ("12.0", "GeForce RTX 5090 D"),
    "PRO6000": ("12.0", "RTX PRO 6000 Blackwell"),
}

_NAME_NOISE = re.compile(r"NVIDIA|GEFORCE|TESLA|RTX|PCIE|SXM\d?|NVLINK|HBM\d?E?|\d+\s*GB|[\s_\-/]+")


def normalise_gpu_name(name: str) -> str:
    """'NVIDIA GeForce RTX 4090 D' -> '4090D'; 'A800-80GB' -> 'A800'; 'vGPU-32GB' -> 'VGPU'."""
    return _NAME_NOISE.sub("", name.upper())


def gpu_capability(name: str) -> tuple[str, str] | None:
    """(compute capability, canonical name) for a GPU name as users write it, or None when unknown."""
    key = normalise_gpu_name(name)
    if key in GPU_CAPABILITY:
        return GPU_CAPABILITY[key]
    # Longest known name that the given one starts with: 'H100NVL' -> H100, 'A100X' -> A100.
    for known in sorted(GPU_CAPABILITY, key=len, reverse=True):
        if key.startswith(known):
            return GPU_CAPABILITY[known]
    return None


# Features by compute capability: bf16 needs Ampere (8.0); flash-attn 2 needs Ampere or newer.
BF16_MIN_CAPABILITY = "8.0"
FLASH_ATTN2_MIN_CAPABILITY = "8.0"

# --- CUDA and drivers -------------------------------------------------------------------------------------------

# CUDA toolkit (major.minor) -> minimum Linux driver.
CUDA_MIN_DRIVER: dict[str, str] = {
    "11.7": "515.43.04",
    "11.8": "520.61.05",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}

# --- torch builds -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchRelease:
    """What one torch minor release ships: CUDA variants, Pythons, C++ ABI of its Linux wheels, and which
    CUDA variant PyPI's plain wheel is (the others live on the PyTorch index for that variant)."""

    cuda: tuple[str, ...]
    python: tuple[str, ...]
    cxx11abi: bool
    pypi_cuda: str


TORCH_RELEASES: dict[str, TorchRelease] = {
    "2.0": TorchRelease(("11.7", "11.8"), ("3.8", "3.9", "3.10", "3.11"), False, "11.7"),
    "2.1": TorchRelease(("11.8", "12.1"), ("3.8", "3.9", "3.10", "3.11"), False, "12.1"),
    "2.2": TorchRelease(("11.8", "12.1"), ("3.8", "3.9", "3.10", "3.11", "3.12"), False, "12.1"),
    "2.3": TorchRelease(("11.8", "12.1"), ("3.8", "3.9", "3.10", "3.11", "3.12"), False, "12.1"),
    "2.4": TorchRelease(("11.8", "12.1", "12.4"), ("3.8", "3.9", "3.10", "3.11", "3.12"), False, "12.1"),
    "2.5": TorchRelease(("11.8", "12.1", "12.4"), ("3.9", "3.10", "3.11", "3.12", "3.13"), False, "12.4"),
    "2.6": TorchRelease(("11.8", "12.4", "12.6"), ("3.9", "3.10", "3.11", "3.12", "3.13"), False, "12.4"),
    "2.7": TorchRelease(("11.8", "12.6", "12.8"), ("3.9", "3.10", "3.11", "3.12", "3.13"), True, "12.6"),
    "2.8": TorchRelease(("12.6", "12.8", "12.9"), ("3.9", "3.10", "3.11", "3.12", "3.13"), True, "12.8"),
    "2.9": TorchRelease(("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13", "3.14"), True, "12.8"),
    "2.10": TorchRelease(("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13", "3.14"), True, "12.8"),
    "2.11": TorchRelease(("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13", "3.14"), True, "13.0"),
}

# CUDA variant of torch's Linux wheels -> the SASS architectures compiled into them (torch.cuda.get_arch_list()).
# A cubin for sm_XY also runs on sm_XZ with Z >= Y (same major); see ``arch_runs_on``.
TORCH_ARCHES: dict[str, tuple[str, ...]] = {
    "11.7": ("3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6"),
    "11.8": ("3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    "12.1": ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    "12.4": ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    "12.6": ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    "12.8": ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
    "12.9": ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
    "13.0": ("7.5", "8.0", "8.6", "9.0", "10.0", "11.0", "12.0"),
}

# The PyTorch index that serves each CUDA variant (the plain PyPI wheel is one of them, see pypi_cuda).
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu{tag}"


def cuda_tag(cuda: str) -> str:
    """'12.1' -> '121' (the local version tag torch uses: 2.3.0+cu121)."""
    return cuda.replace(".", "")


def torch_minor(version: str) -> str:
    """'2.3.0+cu121' -> '2.3'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def arch_runs_on(built: str, gpu: str) -> bool:
    """Whether SASS built for compute capability ``built`` runs on a GPU of capability ``gpu``."""
    b, g = version_tuple(built), version_tuple(gpu)
    return b[0] == g[0] and b[1] <= g[1]


def driver_supports(driver: str, cuda: str) -> bool:
    """Whether a Linux driver version is new enough for a CUDA toolkit version (minor versions not listed
    fall back to the nearest lower listed one)."""
    known = sorted(CUDA_MIN_DRIVER, key=version_tuple)
    candidates = [c for c in known if version_tuple(c) <= version_tuple(cuda)]
    if not candidates:
        return False
    return version_tuple(driver) >= version_tuple(CUDA_MIN_DRIVER[candidates[-1]])


def min_driver(cuda: str) -> str | None:
    known = sorted(CUDA_MIN_DRIVER, key=version_tuple)
    candidates = [c for c in known if version_tuple(c) <= version_tuple(cuda)]
    return CUDA_MIN_DRIVER[candidates[-1]] if candidates else None
