"""The parsed catalog and the questions asked of it about a machine: which image this instance replicates
(``match``), which lockfile this environment claims (``claimed_lockfile``), whether an image runs on a GPU and
driver (``runs_on``), and, before cloning, every image ranked for a GPU the user names (``check_gpu``). Each
question has its answer here and nowhere else; callers pass an ``Environment``.

Parsing and validation are builder/core/spec.py's stages; this module holds their result. Standard library only (the
setup script asks ``match`` on the platform's bare Python).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.core import compat, settings
from builder.core.environment import Capability, Environment, sm_list
from builder.core.errors import SameboxError
from builder.core.spec import ImageSpec, find_image, load_catalog, read_catalog, resolve_spec

# Where a samebox Docker image keeps the lock it was built from (images/Dockerfile.j2).
IMAGE_LOCKFILE = Path("/opt/samebox/lock.txt")

# The providers whose base images a user can rent. A catalog platform label is "PROVIDER: base image"
# (images/matrix.toml); an image whose every platform is another provider's (the project's GPU test machine) is
# checked and built like the rest, but never recommended.
RENTAL_PLATFORMS = ("AutoDL",)

RUNS = "runs"
RUNS_WITHOUT_FLASH_ATTN = "runs without flash-attn"
DOES_NOT_RUN = "does not run"


class PlatformMismatch(SameboxError):
    """The instance is not a platform the catalog replicates; the message names the base image to rent."""


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


@dataclass(frozen=True)
class LockClaim:
    """The lockfile an environment is held to. ``claimed``: samebox set this environment up from it (an image's
    lock, the setup script's record, or one the user named); otherwise it is the nearest image's, for comparison."""

    path: Path | None
    how: str
    claimed: bool
    image: ImageSpec | None = None


@dataclass(frozen=True)
class Catalog:
    """Every catalog image, validated and completed, in file order."""

    images: tuple[ImageSpec, ...]

    @classmethod
    def load(cls, root: Path | None = None) -> Catalog:
        return cls(tuple(load_catalog(root)))

    @classmethod
    def from_json(cls, path: Path) -> Catalog:
        """The entries a standalone setup script embeds (``ImageSpec.to_dict`` of each, without its root: the
        file's directory stands in)."""
        from builder.core.fsutil import read_text

        text = read_text(path, "catalog", "re-render the setup script: samebox setup-script --image ID")
        return cls(tuple(ImageSpec.from_dict({**d, "root": str(path.parent)}) for d in json.loads(text)))

    @classmethod
    def read(cls, path: Path) -> Catalog:
        """images/matrix.toml (its catalog root two levels up), or the JSON list a standalone setup script embeds."""
        if path.suffix == ".json":
            return cls.from_json(path)
        return cls(tuple(read_catalog(path, path.parent.parent)))

    @classmethod
    def load_for_claim(cls, root: Path | None, explicit: str | Path | None, image: str = "",
                       environ: dict[str, str] | None = None) -> Catalog:
        """The catalog, or none where the lock is claimed without it (a lockfile given, or recorded by the setup
        script, in an install of samebox that has no checkout beside it)."""
        environ = os.environ if environ is None else environ
        try:
            return cls.load(root)
        except SameboxError:
            if not image and (explicit or settings.lockfile(environ)):
                return cls(())
            raise

    def find(self, image_id: str) -> ImageSpec:
        return find_image(image_id, list(self.images))

    def resolve(self, torch: str | None, cuda: str | None = None, python: str | None = None) -> ImageSpec:
        return resolve_spec(torch, cuda, python, list(self.images))

    # --- which image this instance replicates -------------------------------------------------------------------

    def _labels(self, spec: ImageSpec) -> str:
        return " or ".join(repr(p) for p in spec.platforms) or f"a base image with torch {spec.torch_full}"

    @staticmethod
    def fits(spec: ImageSpec, env: Environment) -> bool:
        return spec.python == env.python and spec.torch_full == env.torch_version

    def match(self, env: Environment, image: str = "") -> ImageSpec:
        """The image this instance replicates (``image`` forces one), or PlatformMismatch naming the base image to
        rent instead. samebox never replaces the platform's torch, so torch and Python must be the image's."""
        hint = f" ({'; '.join(env.notes)})" if env.notes else ""
        fitting = [s for s in self.images if self.fits(s, env)]
        if image:
            spec = self.find(image)
            if self.fits(spec, env):
                return spec
            instead = f"; this instance matches image {fitting[0].id!r} (setup.sh --image {fitting[0].id})" \
                if fitting else ""
            raise PlatformMismatch(
                f"image {image!r} needs torch {spec.torch_full} on Python {spec.python}, but this instance has "
                f"torch {env.torch_version} on Python {env.python_full} ({env.executable}). samebox never replaces "
                f"the platform's torch: rent the base image {self._labels(spec)}{hint}{instead}")
        if len(fitting) == 1:
            return fitting[0]
        if fitting:
            raise PlatformMismatch(f"{len(fitting)} catalog images fit this instance "
                                   f"({', '.join(s.id for s in fitting)}); pick one with --image ID")
        choices = "; ".join(f"{self._labels(s)} -> {s.id}" for s in self.images if s.has_torch)
        raise PlatformMismatch(f"no catalog image replicates this instance ({env.describe()}, {env.executable})"
                               f"{hint}. Rent one of these base images: {choices}")

    # --- which lockfile this environment claims -----------------------------------------------------------------

    def claimed_lockfile(self, env: Environment, explicit: str | Path | None = None, image: str = "",
                         environ: dict[str, str] | None = None) -> LockClaim:
        """In order: the lockfile given; the image named (``image``); $SAMEBOX_LOCKFILE (the setup script's
        record); a samebox image's /opt/samebox/lock.txt; $SAMEBOX_IMAGE's lock. Otherwise the image whose torch
        and Python this interpreter has, for comparison only (not claimed)."""
        environ = os.environ if environ is None else environ
        if explicit:
            return LockClaim(Path(explicit), "given", True)
        if image:
            spec = self.find(image)
            return LockClaim(spec.lockfile, f"image {spec.id}", True, spec)
        if settings.lockfile(environ):
            return LockClaim(Path(settings.lockfile(environ)), "set up by samebox: $SAMEBOX_LOCKFILE", True)
        if IMAGE_LOCKFILE.is_file():
            named = settings.image(environ)
            spec = next((s for s in self.images if s.id == named), None)
            return LockClaim(IMAGE_LOCKFILE, "the samebox image's lock", True, spec)
        if settings.image(environ):
            spec = self.find(settings.image(environ))
            return LockClaim(spec.lockfile, "set up by samebox: $SAMEBOX_IMAGE", True, spec)
        for spec in self.images:
            if self.fits(spec, env):
                return LockClaim(spec.lockfile, f"not set up by samebox; nearest catalog image {spec.id}", False, spec)
        if env.torch_version == "none":
            return LockClaim(None, "torch is not installed, so no catalog image matches", False)
        return LockClaim(None, f"no catalog image has torch {env.torch_version} with Python {env.python}", False)

    # --- which images run on a GPU and driver -------------------------------------------------------------------

    @staticmethod
    def runs_on(spec: ImageSpec, capability: Capability | str, driver: str = "", gpu: str = "") -> ImageVerdict:
        """Whether ``spec`` runs on a GPU of ``capability`` with ``driver`` (when given), and why not: torch's SASS
        for its CUDA, the driver that CUDA needs, flash-attn 2's floor and archs, bf16."""
        cc = Capability.parse(capability)
        gpu = gpu or f"a {cc.sm} GPU"
        fatal: list[str] = []
        limits: list[str] = []
        if spec.has_torch:
            built = compat.TORCH_ARCHES.get(spec.cuda, ())
            if not any(cc.runs(a) for a in built):
                fixes = sorted((c for c, a in compat.TORCH_ARCHES.items() if any(cc.runs(x) for x in a)),
                               key=compat.version_tuple)
                fatal.append(f"{gpu} is {cc.sm}, not in torch {spec.torch}'s CUDA {spec.cuda} build "
                             f"({sm_list(built, ' ')}): 'no kernel image is available'"
                             + (f"; torch's CUDA {', '.join(fixes)} builds have it" if fixes else ""))
            if driver and not compat.driver_supports(driver, spec.cuda):
                fatal.append(f"driver {driver} is older than CUDA {spec.cuda} needs ({compat.min_driver(spec.cuda)})")
        fa2_floor = Capability.parse(compat.FLASH_ATTN2_MIN_CAPABILITY)
        if cc < fa2_floor:
            limits.append(f"flash-attn 2 needs {fa2_floor.sm}+ (Ampere or newer); {gpu} is {cc.sm}: use sdpa "
                          "attention")
        elif spec.has_torch and not any(cc.runs(a) for a in spec.archs):
            limits.append(f"this image's flash-attn is built for {sm_list(spec.archs, ' ')}, not {gpu}'s {cc.sm}: "
                          "use sdpa attention")
        if cc < Capability.parse(compat.BF16_MIN_CAPABILITY):
            limits.append(f"no bf16 on {cc.sm}: train in fp16")
        if fatal:
            return ImageVerdict(spec.id, spec.torch_full, spec.cuda, DOES_NOT_RUN, tuple(fatal))
        return ImageVerdict(spec.id, spec.torch_full, spec.cuda, RUNS_WITHOUT_FLASH_ATTN if limits else RUNS,
                            tuple(limits))

    def images_that_run(self, capability: Capability | str | None, driver: str = "") -> list[str]:
        """Images with torch that run (flash-attn or not) on ``capability`` (any, when unknown) with ``driver``."""
        found = []
        for spec in self.images:
            if not spec.has_torch:
                continue
            if capability is None:
                if driver and not compat.driver_supports(driver, spec.cuda):
                    continue
            elif self.runs_on(spec, capability, driver).verdict == DOES_NOT_RUN:
                continue
            found.append(spec.id)
        return found

    # --- which flash-attn an environment gets -------------------------------------------------------------------

    def flash_attn_version(self, torch_version: str, cuda: str, python: str) -> str:
        """The flash-attn the catalog image with this torch minor, CUDA and Python pins; else one with the same
        torch minor and CUDA; else the newest known release."""
        same = [s for s in self.images if s.has_torch and compat.torch_minor(s.torch) == compat.torch_minor(
            torch_version) and s.cuda == cuda]
        pinned = [s for s in same if s.python == python] or same
        return pinned[0].flash_attn if pinned else max(compat.FLASH_ATTN_RELEASES, key=compat.version_tuple)


# --- before cloning: every image against a GPU the user names ------------------------------------------------


def gpu_info(name: str) -> tuple[Capability, str]:
    """(compute capability, canonical name) for a GPU name as users see it, or a SameboxError listing names."""
    found = compat.gpu_capability(name)
    if found is None:
        known = ", ".join(sorted({canon for _, canon in compat.GPU_CAPABILITY.values()}))
        raise SameboxError(f"unknown GPU {name!r}",
                           f"use a name like 'RTX 4090', '4090D', 'A800', 'H20', 'vGPU-32GB'; known: {known}")
    return Capability.parse(found[0]), found[1]


def rentable_platforms(spec: ImageSpec) -> list[str]:
    """The platform labels of ``spec`` that name a base image a user can rent (RENTAL_PLATFORMS)."""
    return [p for p in spec.platforms if p.split(":", 1)[0].strip() in RENTAL_PLATFORMS]


def _rank(v: ImageVerdict, spec: ImageSpec) -> tuple[Any, ...]:
    order = {RUNS: 2, RUNS_WITHOUT_FLASH_ATTN: 1, DOES_NOT_RUN: 0}[v.verdict]
    return (order, spec.has_torch, compat.version_tuple(spec.torch) if spec.has_torch else (),
            compat.version_tuple(spec.cuda) if spec.has_torch else (), compat.version_tuple(spec.python))


def check_gpu(name: str, catalog: Catalog, driver: str = "") -> dict[str, Any]:
    """{'gpu', 'compute_capability', 'driver', 'images': [verdict + 'rent': its rentable platforms...], 'best':
    image id or None, 'rent': the base image to rent for it}. The best image is the newest torch among those that
    run fully, else among those that run without flash-attn, of the images a user can rent a base for."""
    cc, canonical = gpu_info(name)
    if driver and not compat.version_tuple(driver):
        raise SameboxError(f"driver {driver!r} is not a version", "give it as nvidia-smi shows it, e.g. 550.54.14")
    verdicts = [catalog.runs_on(spec, cc, driver, canonical) for spec in catalog.images]
    ranked = sorted(((v, s) for v, s in zip(verdicts, catalog.images, strict=True) if rentable_platforms(s)),
                    key=lambda vs: _rank(*vs), reverse=True)
    best = ranked[0] if ranked and ranked[0][0].verdict != DOES_NOT_RUN else None
    return {
        "best": best[0].image if best else None,
        "compute_capability": str(cc),
        "driver": driver or None,
        "gpu": canonical,
        "images": [{**v.to_dict(), "rent": rentable_platforms(s)}
                   for v, s in zip(verdicts, catalog.images, strict=True)],
        "rent": rentable_platforms(best[1])[0] if best else None,
    }
