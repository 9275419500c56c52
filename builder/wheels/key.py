"""The wheel key: everything a flash-attn wheel's binary depends on, from an ImageSpec or from the live environment.

Two wheels with the same key are interchangeable; anything else (torch minor or local tag, CUDA, Python, C++ ABI,
SASS archs, build profile) can fail at import (`undefined symbol`) or at the first kernel ("no kernel image").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from builder.core import compat
from builder.core.catalog import Catalog
from builder.core.environment import Capability, Environment
from builder.core.errors import SameboxError
from builder.core.spec import ImageSpec

PROFILES = tuple(compat.FLASH_ATTN_PROFILES)
DEFAULT_PROFILE = compat.DEFAULT_FLASH_ATTN_PROFILE


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
        return tuple(Capability.parse(a).digits for a in self.archs)

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


def build_archs(capabilities: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """GPU compute capabilities -> the flash-attn SASS archs that run on them (8.6 -> 8.0), sorted, unique."""
    known = sorted(Capability.parse(a) for a in compat.FLASH_ATTN_BUILD_ARCHS)
    fa2_floor = Capability.parse(compat.FLASH_ATTN2_MIN_CAPABILITY)
    out: set[Capability] = set()
    problems: list[str] = []
    for text in capabilities:
        cap = Capability.maybe(text.strip()) if "." in text else None
        if cap is None:
            problems.append(f"{text.strip()!r} is not a compute capability; write it like 8.0, 8.6, 9.0, 12.0")
            continue
        runs = [a for a in known if cap.runs(a)]
        if not runs:
            if cap < fa2_floor:
                problems.append(f"{cap.sm}: flash-attn 2 needs Ampere or newer; the trainer will use SDPA")
            else:
                problems.append(f"{cap.sm}: flash-attn builds SASS only for {', '.join(map(str, known))}; "
                                f"none runs on {cap}")
            continue
        out.add(runs[-1])
    if problems:
        raise SameboxError("no flash-attn build for the requested GPU archs:", "", problems)
    return tuple(str(a) for a in sorted(out))


def arch_notes(capabilities: list[str] | tuple[str, ...]) -> list[str]:
    """Why a requested compute capability is keyed as another build arch (8.9 -> the sm_80 build), one line each;
    build_archs has already refused the ones no build runs on."""
    known = sorted(Capability.parse(a) for a in compat.FLASH_ATTN_BUILD_ARCHS)
    notes = []
    for text in dict.fromkeys(t.strip() for t in capabilities):
        cap = Capability.maybe(text) if "." in text else None
        runs = [a for a in known if cap is not None and cap.runs(a)]
        if runs and runs[-1] != cap:
            notes.append(f"--arch {text} gets the {runs[-1].sm} build: flash-attn compiles SASS for "
                         f"{', '.join(a.sm for a in known)} only, and code built for {runs[-1]} runs on every "
                         f"{cap.major}.x GPU from {runs[-1]} up ({cap.sm} included)")
    return notes


def release_facts(version: str) -> compat.FlashAttnRelease:
    release = compat.FLASH_ATTN_RELEASES.get(version)
    if release is None:
        raise SameboxError(f"flash-attn {version} is not in builder/core/compat.py FLASH_ATTN_RELEASES",
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


def key_from_env(env: Environment, archs: list[str] | None = None, profile: str = DEFAULT_PROFILE,
                 version: str | None = None, catalog: Catalog | None = None) -> WheelKey:
    """The key for the live environment: its torch, CUDA, Python and ABI; archs from --arch or its GPUs; the
    flash-attn version the catalog pins for this torch, CUDA and Python."""
    _check_profile(profile)
    build = env.torch
    if build is None or build.error:
        why = f" ({build.error})" if build and build.error else ""
        raise SameboxError(f"torch is not importable in this Python{why}", f"run with the Python that has torch "
                           f"({env.executable} has none), or use --image ID")
    if not build.cuda_minor:
        raise SameboxError(f"torch {build.version} is a CPU build (torch.version.cuda is None)",
                           "flash-attn needs a CUDA build of torch; install the +cuXXX wheel for your CUDA")
    if not archs:
        archs = [str(c) for c in env.capabilities()]
        if not archs:
            raise SameboxError("no GPU visible and no --arch given", "say which GPUs to build for: --arch 9.0")
    version = version or (catalog or Catalog(())).flash_attn_version(build.version, build.cuda_minor, env.python)
    release_facts(version)
    return WheelKey(version, build.version, build.cuda_minor, env.python_tag, build.cxx11abi, build_archs(archs),
                    profile)
