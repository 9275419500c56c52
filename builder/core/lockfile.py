"""Reading a hashed lockfile: the one parser of its ``name==version --hash=sha256:...`` requirements.

Every reader goes through ``parse_lock``: the lock writer's checks and summaries (builder/image/lock.py), the
workstation layer, and the setup script's steps (builder/instance/drift.py). Imports the standard library only,
since setup.sh reads a lock before anything is installed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from builder.core.environment import canonical_name
from builder.core.errors import SameboxError
from builder.core.fsutil import read_text

# Distributions the platform brings with torch; a setup run verifies them and never installs them (nvidia-ml-py is
# NVML's Python binding, part of the training stack).
PLATFORM_PROVIDED = re.compile(r"^(torch|triton|pytorch-triton|cuda-toolkit|cuda-bindings|cuda-pathfinder"
                               r"|nvidia-(?!ml-py$).+)$")
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)(\[[^\]]*\])?\s*==\s*(?P<version>[^\s;\\]+)")
_SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def is_platform_package(name: str) -> bool:
    """torch and what ships with it (triton, nvidia-* CUDA libraries, cuda-toolkit and its bindings): an image
    installs them from the lock, the setup script never touches them on an instance."""
    return bool(PLATFORM_PROVIDED.match(canonical_name(name)))


@dataclass(frozen=True)
class LockedPackage:
    name: str  # canonical
    version: str
    hashes: frozenset[str] = frozenset()  # sha256 digests
    block: str = ""  # the requirement with its --hash options, ready for a requirements file

    @property
    def platform_provided(self) -> bool:
        return is_platform_package(self.name)


def parse_lock(text: str) -> list[LockedPackage]:
    """Every pinned requirement of a lockfile's text, in file order; comments, options and blank lines dropped."""
    packages = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.split(" #", 1)[0].strip()
        found = REQUIREMENT.match(line)
        if found:
            packages.append(LockedPackage(canonical_name(found["name"]), found["version"],
                                          frozenset(_SHA256.findall(line)), " \\\n    ".join(line.split())))
    return packages


def read_lock_file(path: Path, hint: str = "make it with `samebox lock --image <id>`") -> list[LockedPackage]:
    """``parse_lock`` of a file; a missing or unreadable one is a SameboxError saying ``hint``."""
    if not Path(path).is_file():
        raise SameboxError(f"lockfile not found: {path}", hint)
    return parse_lock(read_text(Path(path), "lockfile", hint))


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of every package a lockfile pins."""
    return {p.name: p.version for p in read_lock_file(path)}
