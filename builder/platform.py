"""Detect the platform an instance was rented with and pick the catalog entry that replicates it.

The platform is what the rental service's base image brought: the Python interpreter, torch and its local tag
(2.3.0+cu121), CUDA, the GPU, and AutoDL's markers (/etc/network_turbo, the AutoDLRegion variable, the data disks).
/etc/profile.d/autodl.env.sh holds a panel token and is never read.

This module runs on a bare interpreter before anything is installed (setup.sh calls ``python -m builder.platform``),
so it imports the standard library only; torch and nvidia-ml-py are imported lazily and may be absent.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import compat
from builder.errors import SameboxError
from builder.fsutil import read_text

NO_TORCH = "none"


@dataclass(frozen=True)
class Platform:
    """What the instance brought. ``torch`` is torch.__version__ ('2.3.0+cu121') or 'none'."""

    python: str  # major.minor
    python_full: str
    executable: str
    torch: str = NO_TORCH
    torch_cuda: str = NO_TORCH
    gpus: tuple[str, ...] = ()
    driver: str = ""
    autodl: bool = False
    autodl_region: str = ""
    data_disk: str = ""
    shared_fs: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        parts = [f"Python {self.python_full}", f"torch {self.torch}"]
        if self.torch_cuda != NO_TORCH:
            parts.append(f"CUDA {self.torch_cuda}")
        parts.append(", ".join(self.gpus) if self.gpus else "no GPU")
        if self.autodl:
            parts.append("AutoDL" + (f" ({self.autodl_region})" if self.autodl_region else ""))
        return " / ".join(parts)


def detect() -> Platform:
    """The platform of the interpreter running this function (builder/environment.py probes it)."""
    from builder.environment import Environment

    env = Environment.probe()
    return Platform(
        python=env.python,
        python_full=env.python_full,
        executable=env.executable,
        torch=env.torch_version,
        torch_cuda=env.torch_cuda,
        gpus=tuple(g.name for g in env.gpus),
        driver=env.driver,
        autodl=env.rental.autodl,
        autodl_region=env.rental.region,
        data_disk=env.rental.data_disk,
        shared_fs=env.rental.shared_fs,
        notes=env.notes,
    )


# --- matching ---------------------------------------------------------------------------------------------------


class PlatformMismatch(Exception):
    """The instance is not a platform the catalog replicates; the message names the base image to rent."""


def entry_torch(entry: dict[str, Any]) -> str:
    """What torch.__version__ reports for a catalog entry: '2.3.0+cu121', or 'none'."""
    if entry["torch"] == NO_TORCH:
        return NO_TORCH
    return f"{entry['torch']}+{entry['torch_local']}"


def _labels(entry: dict[str, Any]) -> str:
    return " or ".join(repr(p) for p in entry.get("platforms", [])) or f"a base image with torch {entry_torch(entry)}"


def _fits(entry: dict[str, Any], plat: Platform) -> bool:
    return entry["python"] == plat.python and entry_torch(entry) == plat.torch


def match_entry(plat: Platform, entries: list[dict[str, Any]], image: str = "") -> dict[str, Any]:
    """The catalog entry this platform replicates (``image`` forces one), or PlatformMismatch saying which base
    image to pick instead."""
    fitting = [e for e in entries if _fits(e, plat)]
    if image:
        chosen = [e for e in entries if e["id"] == image]
        if not chosen:
            raise PlatformMismatch(f"no catalog image {image!r}; known: {', '.join(e['id'] for e in entries)}")
        entry = chosen[0]
        if _fits(entry, plat):
            return entry
        instead = f"; this instance matches image {fitting[0]['id']!r} (setup.sh --image {fitting[0]['id']})" \
            if fitting else ""
        raise PlatformMismatch(
            f"image {image!r} needs torch {entry_torch(entry)} on Python {entry['python']}, but this instance has "
            f"torch {plat.torch} on Python {plat.python_full} ({plat.executable}). samebox never replaces the "
            f"platform's torch: rent the base image {_labels(entry)}{instance_hint(plat)}{instead}"
        )
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise PlatformMismatch(
            f"{len(fitting)} catalog images fit this instance ({', '.join(e['id'] for e in fitting)}); "
            "pick one with --image ID"
        )
    choices = "; ".join(f"{_labels(e)} -> {e['id']}" for e in entries if e["torch"] != NO_TORCH)
    raise PlatformMismatch(
        f"no catalog image replicates this instance ({plat.describe()}, {plat.executable}){instance_hint(plat)}. "
        f"Rent one of these base images: {choices}"
    )


def instance_hint(plat: Platform) -> str:
    return f" ({'; '.join(plat.notes)})" if plat.notes else ""


# --- command line for setup.sh ----------------------------------------------------------------------------------


def _read_entries(catalog: Path) -> list[dict[str, Any]]:
    """[[image]] entries of images/matrix.toml, or of a JSON list (the entry a standalone setup script embeds)."""
    text = read_text(catalog, "catalog", "pass images/matrix.toml (UTF-8) or the JSON list a setup script embeds")
    if catalog.suffix == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10: tomli if present, else the copy pip vendors
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads(text)["image"]


def flash_attn2_gpus(names: tuple[str, ...]) -> str:
    """'yes' when a GPU can run flash-attn 2 (sm80+) or one is unknown (the resolver decides), 'no' when there is no
    GPU or every GPU is known to be older (V100, T4, 2080 Ti: the trainer uses SDPA there)."""
    caps = [compat.gpu_capability(n) for n in names]
    if any(c is None for c in caps):
        return "yes"
    floor = compat.version_tuple(compat.FLASH_ATTN2_MIN_CAPABILITY)
    return "yes" if any(compat.version_tuple(c[0]) >= floor for c in caps if c) else "no"


def shell_assignments(plat: Platform, entry: dict[str, Any]) -> str:
    """KEY=value lines for bash's eval, every value quoted."""
    values = {
        "SB_IMAGE": entry["id"],
        "SB_IMAGE_TORCH": entry_torch(entry),
        "SB_PROVIDER": entry["python_provider"],
        "SB_PYTHON_VERSION": plat.python_full,
        "SB_TORCH": plat.torch,
        "SB_TORCH_CUDA": plat.torch_cuda,
        "SB_GPUS": ", ".join(plat.gpus),
        "SB_FA2_GPU": flash_attn2_gpus(plat.gpus),
        "SB_DRIVER": plat.driver,
        "SB_FLASH_ATTN": entry.get("flash_attn", ""),
        "SB_AUTODL": "1" if plat.autodl else "",
        "SB_AUTODL_REGION": plat.autodl_region,
        "SB_DATA_DISK": plat.data_disk,
        "SB_SHARED_FS": plat.shared_fs,
        "SB_PLATFORM": plat.describe(),
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(values.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.platform", description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, help="images/matrix.toml, or a JSON list of entries")
    parser.add_argument("--image", default="", help="the catalog entry to replicate (default: the one that fits)")
    parser.add_argument("--json", action="store_true", help="print the detected platform as JSON and exit")
    args = parser.parse_args(argv)
    plat = detect()
    if args.json or not args.catalog:
        json.dump(asdict(plat), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    try:
        entry = match_entry(plat, _read_entries(args.catalog), args.image)
    except (PlatformMismatch, SameboxError) as e:
        print(f"samebox: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(shell_assignments(plat, entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
