"""The wheel key: everything a flash-attn wheel's binary depends on, from an ImageSpec or from the live environment.

Two wheels with the same key are interchangeable; anything else (torch minor or local tag, CUDA, Python, C++ ABI,
SASS archs, build profile) can fail at import (`undefined symbol`) or at the first kernel ("no kernel image").
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import compat
from builder.errors import SameboxError
from builder.spec import ImageSpec

PROFILES = tuple(compat.FLASH_ATTN_PROFILES)
DEFAULT_PROFILE = "full"


@dataclass(frozen=True)
class WheelKey:
    flash_attn: str  # "2.8.3"
    torch: str  # "2.11.0+cu130": torch.__version__, local tag included
    cuda: str  # "13.0": torch.version.cuda, major.minor
    python: str  # "cp312"
    cxx11abi: bool
    archs: tuple[str, ...]  # SASS compiled in, sorted: ("8.0", "9.0")
    profile: str  # a compat.FLASH_ATTN_PROFILES key: "full" | "slim" | "lean"

    @property
    def torch_minor(self) -> str:
        return compat.torch_minor(self.torch)

    @property
    def sm_codes(self) -> tuple[str, ...]:
        """('8.0', '9.0') -> ('80', '90'): FLASH_ATTN_CUDA_ARCHS entries and cuobjdump's sm_XX."""
        return tuple(a.replace(".", "") for a in self.archs)

    @property
    def local_version(self) -> str:
        """The wheel's local version label: distinct file names for distinct keys in one --find-links dir."""
        abi = "TRUE" if self.cxx11abi else "FALSE"
        return (f"cu{compat.cuda_tag(self.cuda)}torch{self.torch_minor}cxx11abi{abi}"
                f".sm{'.sm'.join(self.sm_codes)}.{self.profile}").lower()

    @property
    def id(self) -> str:
        """Readable and unique: fa2.8.3-torch2.11.0+cu130-cp312-abi1-sm90-slim-<hash>."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return (f"fa{self.flash_attn}-torch{self.torch}-{self.python}-abi{int(self.cxx11abi)}"
                f"-sm{'_'.join(self.sm_codes)}-{self.profile}-{digest}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["archs"] = list(self.archs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WheelKey:
        return cls(**{**d, "archs": tuple(d["archs"])})


@dataclass(frozen=True)
class EnvFacts:
    """What the live environment says; ``probe_env`` reads it, tests build it by hand."""

    torch: str | None  # torch.__version__, None when torch is not importable
    torch_cuda: str | None  # torch.version.cuda, None for a CPU build
    cxx11abi: bool
    python: str  # "3.12"
    gpus: tuple[tuple[str, str], ...] = field(default=())  # (name, capability "9.0")


def probe_env() -> EnvFacts:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        import torch
    except ImportError:
        return EnvFacts(None, None, True, python)
    gpus: list[tuple[str, str]] = []
    if torch.version.cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append((torch.cuda.get_device_name(i), f"{major}.{minor}"))
    return EnvFacts(torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI), python,
                    tuple(gpus))


def build_archs(capabilities: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """GPU compute capabilities -> the flash-attn SASS archs that run on them (8.6 -> 8.0), sorted, unique."""
    known = sorted(compat.FLASH_ATTN_BUILD_ARCHS, key=compat.version_tuple)
    out: set[str] = set()
    problems: list[str] = []
    for cap in capabilities:
        cap = cap.strip()
        if not cap or not all(p.isdigit() for p in cap.split(".")) or cap.count(".") != 1:
            problems.append(f"{cap!r} is not a compute capability; write it like 8.0, 8.6, 9.0, 12.0")
            continue
        runs = [a for a in known if compat.arch_runs_on(a, cap)]
        if not runs:
            if compat.version_tuple(cap) < compat.version_tuple(compat.FLASH_ATTN2_MIN_CAPABILITY):
                problems.append(f"sm_{cap.replace('.', '')}: flash-attn 2 needs Ampere or newer; "
                                "the trainer will use SDPA")
            else:
                problems.append(f"sm_{cap.replace('.', '')}: flash-attn builds SASS only for "
                                f"{', '.join(known)}; none runs on {cap}")
            continue
        out.add(runs[-1])
    if problems:
        raise SameboxError("no flash-attn build for the requested GPU archs:", "", problems)
    return tuple(sorted(out, key=compat.version_tuple))


def release_facts(version: str) -> compat.FlashAttnRelease:
    release = compat.FLASH_ATTN_RELEASES.get(version)
    if release is None:
        raise SameboxError(f"flash-attn {version} is not in builder/compat.py FLASH_ATTN_RELEASES",
                           f"known versions: {', '.join(compat.FLASH_ATTN_RELEASES)} (add its sdist sha256 there)")
    return release


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise SameboxError(f"unknown build profile {profile!r}", f"use one of: {', '.join(PROFILES)}")


def key_from_spec(spec: ImageSpec, archs: list[str] | None = None, profile: str = DEFAULT_PROFILE,
                  version: str | None = None) -> WheelKey:
    """The key of the wheel a catalog image needs (its archs unless ``archs`` narrows them)."""
    _check_profile(profile)
    if not spec.has_torch:
        raise SameboxError(f"image {spec.id} has no torch", "flash-attn needs torch with CUDA; pick another image")
    version = version or spec.flash_attn
    release_facts(version)
    return WheelKey(version, spec.torch_full, spec.cuda, spec.python_tag, spec.cxx11abi,
                    build_archs(archs or list(spec.archs)), profile)


def default_version(torch_version: str, cuda: str, catalog: list[ImageSpec]) -> str:
    """The flash-attn a catalog image with this torch minor + CUDA pins, else the newest known release."""
    for spec in catalog:
        if spec.has_torch and compat.torch_minor(spec.torch) == compat.torch_minor(torch_version) and spec.cuda == cuda:
            return spec.flash_attn
    return max(compat.FLASH_ATTN_RELEASES, key=compat.version_tuple)


def key_from_env(facts: EnvFacts, archs: list[str] | None = None, profile: str = DEFAULT_PROFILE,
                 version: str | None = None, catalog: list[ImageSpec] | None = None) -> WheelKey:
    """The key for the live environment: its torch, CUDA, Python and ABI; archs from --arch or its GPUs."""
    _check_profile(profile)
    if facts.torch is None:
        raise SameboxError("torch is not importable in this Python", f"run with the Python that has torch "
                           f"({sys.executable} has none), or use --image ID")
    if not facts.torch_cuda:
        raise SameboxError(f"torch {facts.torch} is a CPU build (torch.version.cuda is None)",
                           "flash-attn needs a CUDA build of torch; install the +cuXXX wheel for your CUDA")
    if not archs:
        if not facts.gpus:
            raise SameboxError("no GPU visible and no --arch given", "say which GPUs to build for: --arch 9.0")
        archs = [cap for _, cap in facts.gpus]
    cuda = ".".join(facts.torch_cuda.split(".")[:2])
    version = version or default_version(facts.torch, cuda, catalog or [])
    release_facts(version)
    return WheelKey(version, facts.torch, cuda, "cp" + facts.python.replace(".", ""), facts.cxx11abi,
                    build_archs(archs), profile)
