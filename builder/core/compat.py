"""Compatibility facts as data: GPUs, drivers, torch builds, flash-attn. The only place these numbers live.

Every function here is a lookup over the tables; callers never encode version knowledge of their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HARDWARE_TABLES = Path(__file__).resolve().parents[1] / "data" / "hardware.json"
_CAPABILITY = re.compile(r"^\d{1,2}\.\d$")
_DRIVER = re.compile(r"^\d+(\.\d+){1,2}$")


def load_tables(path: Path = HARDWARE_TABLES) -> dict[str, dict[str, Any]]:
    """builder/data/hardware.json, checked: every capability 'M.m', every driver dotted numbers, every torch
    release's CUDA variants with arches and a driver minimum. A broken edit fails here, naming each problem."""
    data = json.loads(path.read_text(encoding="utf-8"))
    tables = {name: {k: v for k, v in table.items() if k != "_about"}
              for name, table in data.items() if name != "_about"}
    problems = []
    for name, (cap, canonical) in tables["gpus"].items():
        if not _CAPABILITY.match(cap) or not canonical:
            problems.append(f"gpus.{name}: want [\"M.m\", \"canonical name\"], got {[cap, canonical]}")
    for cuda, driver in tables["cuda_min_driver"].items():
        if not _DRIVER.match(driver):
            problems.append(f"cuda_min_driver.{cuda}: {driver!r} is not a driver version")
    for cuda, arches in tables["torch_arches"].items():
        problems += [f"torch_arches.{cuda}: {a!r} is not M.m" for a in arches if not _CAPABILITY.match(a)]
    for minor, release in tables["torch_releases"].items():
        if release["pypi_cuda"] not in release["cuda"]:
            problems.append(f"torch_releases.{minor}: pypi_cuda {release['pypi_cuda']} is not one of its CUDA variants")
        problems += [f"torch_releases.{minor}: CUDA {c} has no torch_arches row" for c in release["cuda"]
                     if c not in tables["torch_arches"]]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return tables


_TABLES = load_tables()

# --- GPUs -------------------------------------------------------------------------------------------------------

# Marketing name (as users and the rental platforms write it, normalised by ``normalise_gpu_name``) ->
# (compute capability, canonical name): builder/data/hardware.json's "gpus".
GPU_CAPABILITY: dict[str, tuple[str, str]] = {k: (v[0], v[1]) for k, v in _TABLES["gpus"].items()}

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
# A kernel agrees with its fp32 reference below this relative error: flash-attn's varlen check (the wheel verifier
# and the self-test), the trainer's varlen attention backends and Liger's kernels (which fall back when over it).
AGREEMENT_REL_ERROR = 2e-2


def flash_attn2_runs(major: int, minor: int = 0) -> bool:
    """flash-attn 2's kernels run on compute capability ``major.minor`` (Ampere, sm80, or newer)."""
    floor = tuple(int(x) for x in FLASH_ATTN2_MIN_CAPABILITY.split("."))
    return (major, minor) >= floor

# --- CUDA and drivers -------------------------------------------------------------------------------------------

# CUDA toolkit (major.minor) -> minimum Linux driver: hardware.json's "cuda_min_driver".
CUDA_MIN_DRIVER: dict[str, str] = dict(_TABLES["cuda_min_driver"])

# --- torch builds -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchRelease:
    """What one torch minor release ships: CUDA variants, Pythons, C++ ABI of its Linux wheels, and which
    CUDA variant PyPI's plain wheel is (the others live on the PyTorch index for that variant)."""

    cuda: tuple[str, ...]
    python: tuple[str, ...]
    cxx11abi: bool
    pypi_cuda: str


# hardware.json's "torch_releases".
TORCH_RELEASES: dict[str, TorchRelease] = {
    minor: TorchRelease(tuple(r["cuda"]), tuple(r["python"]), bool(r["cxx11abi"]), r["pypi_cuda"])
    for minor, r in _TABLES["torch_releases"].items()}

# CUDA variant of torch's Linux wheels -> the SASS architectures compiled into them (torch.cuda.get_arch_list()).
# A cubin for sm_XY also runs on sm_XZ with Z >= Y (same major); see ``Capability.runs`` (builder/core/environment.py).
TORCH_ARCHES: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in _TABLES["torch_arches"].items()}

# The PyTorch index that serves each CUDA variant (the plain PyPI wheel is one of them, see pypi_cuda).
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu{tag}"


def cuda_tag(cuda: str) -> str:
    """'12.1' -> '121' (the local version tag torch uses: 2.3.0+cu121)."""
    return cuda.replace(".", "")


def torch_minor(version: str) -> str:
    """'2.3.0+cu121' -> '2.3'."""
    parts = torch_release(version).split(".")
    return ".".join(parts[:2])


def torch_release(version: str) -> str:
    """'2.3.0+cu121' -> '2.3.0' (the local tag dropped)."""
    return version.split("+")[0]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


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

# --- flash-attn wheels (builder/wheels) -------------------------------------------------------------------------

# flash-attn's setup.py compiles SASS for these compute capabilities only (no PTX): a GPU runs the highest one of
# the same major that is not above it (8.6 and 8.9 run the sm_80 build). Value: the least nvcc that targets it.
FLASH_ATTN_BUILD_ARCHS: dict[str, str] = {"8.0": "11.7", "9.0": "11.8", "10.0": "12.8", "12.0": "12.8"}


@dataclass(frozen=True)
class FlashAttnRelease:
    """One flash-attn release: its PyPI sdist and how its official GitHub wheels are named and built.

    ``wheel_cuda`` lists the CUDA tags in official wheel names (setup.py ``get_wheel_url``: 2.6.x names
    major+minor, cu118/cu123; 2.7.0 on names the major only, cu12). ``release_archs`` is the SASS in those wheels.
    ``arch_env``: whether setup.py honours FLASH_ATTN_CUDA_ARCHS (older ones always build sm_80 + sm_90).
    ``objects``: compile units of the CUDA extension (ninja's total), for the ETA.
    ``torch``: minors with official wheels, as seen in wheel URLs under the release's GitHub tag (not every
    minor was checked for every Python/ABI; a miss is a 404 and the resolver goes on to build). Empty: none known.
    """

    sdist_sha256: str
    sdist_url: str
    wheel_cuda: tuple[str, ...]
    torch: tuple[str, ...]
    python: tuple[str, ...]
    release_archs: tuple[str, ...]
    arch_env: bool
    objects: int


_PYPI_FILES = "https://files.pythonhosted.org/packages"

FLASH_ATTN_RELEASES: dict[str, FlashAttnRelease] = {
    "2.6.3": FlashAttnRelease(
        "5bfae9500ad8e7d2937ebccb4906f3bc464d1bf66eedd0e4adabd520811c7b52",
        f"{_PYPI_FILES}/cd/1e/21321670cd3c2f225026d9fd89272cae661529238850e79f48ccf2f9e4e3/flash_attn-2.6.3.tar.gz",
        ("11.8", "12.3"), ("2.0", "2.1", "2.2", "2.3", "2.4"), ("3.8", "3.9", "3.10", "3.11", "3.12"),
        ("8.0", "9.0"), False, 85,
    ),
    "2.7.4.post1": FlashAttnRelease(
        "f03485c9a49a4d68d0733acdcad80ab0e72afa025a777fdc2966ceccf9d51765",
        f"{_PYPI_FILES}/11/34/9bf60e736ed7bbe15055ac2dab48ec67d9dbd088d2b4ae318fd77190ab4e/"
        "flash_attn-2.7.4.post1.tar.gz",
        ("12",), ("2.2", "2.3", "2.4", "2.5", "2.6", "2.7"), ("3.9", "3.10", "3.11", "3.12", "3.13"),
        ("8.0", "9.0"), True, 85,
    ),
    "2.8.3": FlashAttnRelease(
        "1e71dd64a9e0280e0447b8a0c2541bad4bf6ac65bdeaa2f90e51a9e57de0370d",
        f"{_PYPI_FILES}/3b/b2/8d76c41ad7974ee264754709c22963447f7f8134613fd9ce80984ed0dab7/flash_attn-2.8.3.tar.gz",
        ("12",), ("2.4", "2.5", "2.6", "2.7", "2.8", "2.9"), ("3.9", "3.10", "3.11", "3.12", "3.13"),
        ("8.0", "9.0", "10.0", "12.0"), True, 73,
    ),
    "2.8.3.post2": FlashAttnRelease(
        "d0f9f0b08a986cdeadbffcf5ec8b3a8f514366c68ad1853d3ab061bc83cc340b",
        f"{_PYPI_FILES}/6c/b1/b77625e3d11260d2bd6a4fc249a4be9a3da97ff848e2222e810c4f0e0211/"
        "flash_attn-2.8.3.post2.tar.gz",
        ("12",), (), ("3.9", "3.10", "3.11", "3.12", "3.13"),
        ("8.0", "9.0", "10.0", "12.0"), True, 73,
    ),
}

# Build profiles: preprocessor switches flash-attn's sources read (csrc/flash_attn/src/static_switch.h compiles the
# feature's kernel variants out; flash_api.cpp keeps a TORCH_CHECK that raises when a call asks for it).
_SLIM = (
    "FLASHATTENTION_DISABLE_DROPOUT",
    "FLASHATTENTION_DISABLE_ALIBI",
    "FLASHATTENTION_DISABLE_SOFTCAP",
    "FLASHATTENTION_DISABLE_LOCAL",
)
FLASH_ATTN_PROFILES: dict[str, tuple[str, ...]] = {
    "full": (),
    "slim": _SLIM,
    # Also only the head dims flash-attn runs unpadded (EVEN_HEAD_DIMS: those of Llama, Qwen, Mistral, Phi-3 and
    # Gemma; not Phi-2's 80). Every kernel's uneven-K variant goes.
    "lean": _SLIM + ("FLASHATTENTION_DISABLE_UNEVEN_K",),
}
DEFAULT_FLASH_ATTN_PROFILE = "full"  # every feature; slim and lean trade features for build time
# flash-attn 2.x rounds a head dim up to a multiple of 32 (up to 128) or of 64 (above), at most 256 (flash_api.cpp:
# round_multiple(head_size, head_size <= 128 ? 32 : 64)); a lean build refuses any head dim it would round.
FLASH_ATTN_EVEN_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
FLASH_ATTN_PROFILE_HELP = (
    "full: every feature; slim: dropout, ALiBi, softcap and local attention compiled out; lean: slim and only "
    "head dims " + ", ".join(map(str, FLASH_ATTN_EVEN_HEAD_DIMS))
)


def flash_attn_head_dim_even(head_dim: int) -> bool:
    """Whether flash-attn runs ``head_dim`` without padding it (what a lean build requires)."""
    return head_dim in FLASH_ATTN_EVEN_HEAD_DIMS


# Mean CPU-seconds of one object for one arch, for the ETA only: flash-attn 2.8.3, torch 2.11, CUDA 13.0, sm_90 at
# 16 jobs on an H100 machine's 16 cores (bench/results/flash_attn_build.json). Slim: 73 objects, 7,307 CPU-s -> 100 s;
# lean: 5,590 CPU-s -> 77 s. Full: a measured build on another 16-core machine took ~3.9x its slim build (25 min vs
# 383 s for slim there), so 3.9 x 100 s.
FLASH_ATTN_OBJECT_SECONDS: dict[str, float] = {"slim": 100.0, "full": 390.0, "lean": 77.0}
# RAM one nvcc job needs (GB); MAX_JOBS = min(cores, free RAM / this) for one arch.
FLASH_ATTN_JOB_RAM_GB = 4.0

# --- matmul throughput ------------------------------------------------------------------------------------------

# GPU (name as ``normalise_gpu_name`` writes it; "-PCIE" marks the PCIe form factor where it differs) -> dense
# bf16 TFLOP/s that a healthy card sustains on back-to-back 8192^3 torch matmuls
# (builder/selftest/gpu_probes.py).
# The self-test fails a card under 0.75x of this. H100 is measured: the median one-second window of full mode's 25 s
# load on an H100 80GB HBM3 (tests/fixtures/nvml/healthy_full.json; 667, other runs 673-678 = 0.68x its datasheet
# peak); the others are 0.7x the datasheet's dense bf16 (fp32 accumulate) peak, the fraction cuBLAS reaches.
BF16_MATMUL_TFLOPS: dict[str, float] = {
    "A100": 220.0,
    "A800": 220.0,
    "A30": 115.0,
    "A10": 85.0,
    "A40": 105.0,
    "A6000": 108.0,
    "3090": 50.0,
    "4090": 115.0,
    "4090D": 103.0,
    "L4": 85.0,
    "L20": 84.0,
    "L40": 127.0,
    "L40S": 253.0,
    "H20": 104.0,
    "H100": 667.0,
    "H100-PCIE": 530.0,
    "H800": 690.0,
    "H200": 690.0,
    "GH200": 690.0,
    "B200": 1575.0,
    "5090": 147.0,
}


# --- image build tools ------------------------------------------------------------------------------------------

# Installed (hash-checked) only in the Dockerfile's flash-attn stage, for source builds; never in the final image.
FLASH_ATTN_BUILD_TOOLS: tuple[str, ...] = (
    "ninja==1.13.0 --hash=sha256:fb46acf6b93b8dd0322adc3a4945452a4e774b75b91293bafcc7b7f8e6517dfa",
)

# --- multi-GPU all-reduce ---------------------------------------------------------------------------------------

# Topology -> all-reduce bus bandwidth (GB/s; nccl-tests' busbw = algbw * 2(n-1)/n) that a healthy single node
# reaches on 256 MiB float32 all-reduces (builder/selftest/allreduce.py). "nvlink:<GPU>" (name as
# ``normalise_gpu_name`` writes it): GPUs joined by NVLink/NVSwitch; "pcie:<gen>": GPUs that talk over PCIe (P2P
# through a switch or the CPU, or through host memory). Measured (bench/multigpu_selftest.py, bench/results/
# multigpu.json): two H200s over NVLink NV18 reach 297.8 GB/s (299.1 under torchrun), two H100s 295.6: H100/H200/H20
# (450 GB/s links) are 300. The others are estimates at the same 0.67x of one direction of the link (A100 300 GB/s,
# A800/H800 200) and, for PCIe, about 0.55x of one direction of an x16 link (gen3/4/5: 16/32/64 GB/s), the ratio
# public nccl-tests results show; with NCCL_P2P_DISABLE=1 the H200 pair fell to 27.7 GB/s (0.09x). Eight GPUs on an
# NVSwitch reach more than two; the self-test only warns under 0.5x.
NCCL_BUSBW_GBPS: dict[str, float] = {
    "nvlink:A100": 200.0,
    "nvlink:A800": 133.0,
    "nvlink:H100": 300.0,
    "nvlink:H800": 133.0,
    "nvlink:H200": 300.0,
    "nvlink:H20": 300.0,
    "pcie:3": 9.0,
    "pcie:4": 18.0,
    "pcie:5": 36.0,
}

# --- serving engines (`samebox serve`) ----------------------------------------------------------------------------

# torch major.minor -> the vLLM release that pins exactly that torch (vLLM pins its own torch: another torch means
# replacing the platform's, which samebox never does). Read from `uv pip compile vllm` with the catalog torch as a
# constraint: torch 2.8 -> 0.11.0, 2.11 -> 0.26.0. Not listed: torch 2.1/2.3 (no release, or one from 2023 that
# predates the locked transformers) and 2.5 (vllm 0.7.3 predates transformers 5, which that lock has).
# SGLang (0.5.23: torch 2.14.1, transformers 5.19.0, manylinux_2_34) fits no catalog image.
VLLM_FOR_TORCH: dict[str, str] = {"2.8": "0.11.0", "2.11": "0.26.0"}
