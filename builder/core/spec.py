"""The catalog and the resolver: images/matrix.toml + user intent -> one frozen ImageSpec.

Stages: ``parse_catalog`` (TOML -> raw entries) -> ``validate_entries`` (every problem collected, each naming the
entry and field) -> ``complete_entry`` (derived fields from builder/core/compat.py) -> ``resolve_spec`` (TORCH/CUDA/
PYTHON intent -> exactly one ImageSpec, or an error listing what would work).
ImageSpec is the only thing passed between stages downstream; nothing re-reads the matrix after this module.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from builder.core import compat
from builder.core.environment import NO_TORCH
from builder.core.errors import SameboxError
from builder.core.fsutil import read_text
from builder.core.settings import project_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 platforms: tomli if present, else the copy pip vendors
    try:
        import tomli as tomllib
    except ImportError:
        from pip._vendor import tomli as tomllib

PYTHON_PROVIDERS = ("conda", "system")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?([a-z]+\d*)?(\.post\d+)?$")
_MM_RE = re.compile(r"^\d+\.\d+$")

# field -> (python type, required)
FIELDS: dict[str, tuple[type, bool]] = {
    "id": (str, True),
    "torch": (str, True),
    "torch_local": (str, True),
    "cuda": (str, True),
    "cudnn": (str, True),
    "python": (str, True),
    "os": (str, True),
    "base_image": (str, True),
    "base_digest": (str, False),
    "python_provider": (str, True),
    "archs": (list, True),
    "flash_attn": (str, True),
    "torch_index": (str, True),
    "platforms": (list, True),
}


@dataclass(frozen=True)
class ImageSpec:
    """One fully resolved environment. ``root`` is the catalog root holding images/ and lockfiles/."""

    id: str
    torch: str  # "2.3.0", or "none" for a test entry without torch
    torch_local: str  # "cu121"
    cuda: str  # "12.1", or "none"
    cudnn: str
    python: str  # "3.12"
    os: str
    base_image: str
    base_digest: str
    python_provider: str
    archs: tuple[str, ...]
    flash_attn: str
    torch_index: str  # "pypi" or an index URL
    platforms: tuple[str, ...]
    cxx11abi: bool
    conda_installer: str  # "Miniconda3-py312_25.1.1-2-Linux-x86_64.sh", "" for the system provider
    conda_sha256: str
    root: Path = field(compare=False)

    @property
    def has_torch(self) -> bool:
        return self.torch != NO_TORCH

    @property
    def torch_full(self) -> str:
        """'2.3.0+cu121': what torch.__version__ reports in this environment."""
        return f"{self.torch}+{self.torch_local}" if self.has_torch else NO_TORCH

    @property
    def base_ref(self) -> str:
        """The base image reference, digest-pinned when a digest is known."""
        if self.base_digest:
            return f"{self.base_image.split('@')[0]}@{self.base_digest}"
        return self.base_image

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    @property
    def lockfile(self) -> Path:
        return self.root / "lockfiles" / f"{self.id}.txt"

    @property
    def requirements_in(self) -> Path:
        return self.root / "images" / "requirements.in"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        """The inverse of ``to_dict`` (derived keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        return cls(**{**values, "archs": tuple(values["archs"]), "platforms": tuple(values["platforms"]),
                      "root": Path(values["root"])})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["root"] = str(self.root)
        d["archs"] = list(self.archs)
        d["platforms"] = list(self.platforms)
        d["torch_full"] = self.torch_full
        d["base_ref"] = self.base_ref
        d["lockfile"] = str(self.lockfile)
        return d


# --- parse ------------------------------------------------------------------------------------------------------


def catalog_path(root: Path | None = None) -> Path:
    return (root or project_root()) / "images" / "matrix.toml"


def parse_catalog(path: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Raw [[image]] entries and the [[conda]] installers keyed by Python major.minor."""
    if not path.is_file():
        raise SameboxError(f"catalog not found: {path}", "run from a samebox checkout or set SAMEBOX_ROOT")
    try:
        data = tomllib.loads(read_text(path, "catalog", "save it as UTF-8 text; `samebox images` re-reads it"))
    except tomllib.TOMLDecodeError as e:
        raise SameboxError(f"{path}: not valid TOML: {e}", "fix the syntax; `samebox images` re-reads it") from e
    entries = data.get("image")
    if not isinstance(entries, list) or not entries:
        raise SameboxError(f"{path}: no [[image]] entries", "add at least one [[image]] table")
    installers: dict[str, dict[str, Any]] = {}
    for i, inst in enumerate(data.get("conda", [])):
        fields = ("python", "installer", "sha256")
        if not (isinstance(inst, dict) and all(isinstance(inst.get(k), str) for k in fields)):
            raise SameboxError(f"{path}: [[conda]] #{i + 1} needs string fields python, installer, sha256")
        installers[inst["python"]] = inst
    return entries, installers


# --- validate ---------------------------------------------------------------------------------------------------


def _entry_problems(i: int, raw: dict[str, Any]) -> list[str]:
    name = raw.get("id") if isinstance(raw.get("id"), str) else f"#{i + 1}"
    where = f"image {name!r}"
    problems: list[str] = []
    for key, (typ, required) in FIELDS.items():
        if key not in raw:
            if required:
                problems.append(f"{where}: field '{key}' is missing")
            continue
        if not isinstance(raw[key], typ):
            problems.append(f"{where}: field '{key}' must be a {typ.__name__}, got {type(raw[key]).__name__}")
    for key in raw:
        if key not in FIELDS:
            problems.append(f"{where}: unknown field '{key}' (known: {', '.join(FIELDS)})")
    if problems:
        return problems

    if not _ID_RE.match(raw["id"]):
        problems.append(f"{where}: field 'id' must be lower-case letters, digits, '.' and '-'")
    if raw["python_provider"] not in PYTHON_PROVIDERS:
        problems.append(
            f"{where}: field 'python_provider' is {raw['python_provider']!r}; use one of {', '.join(PYTHON_PROVIDERS)}"
        )
    if not _MM_RE.match(raw["python"]):
        problems.append(f"{where}: field 'python' must be major.minor like '3.12', got {raw['python']!r}")
    for arch in raw["archs"]:
        if not isinstance(arch, str) or not _MM_RE.match(arch):
            problems.append(f"{where}: field 'archs' holds {arch!r}; use compute capabilities like '8.0', '9.0'")
    if not all(isinstance(p, str) for p in raw["platforms"]):
        problems.append(f"{where}: field 'platforms' must be a list of strings")
    if raw["base_digest"] if "base_digest" in raw else "":
        if not re.match(r"^sha256:[0-9a-f]{64}$", raw["base_digest"]):
            problems.append(f"{where}: field 'base_digest' must look like sha256:<64 hex>")

    if raw["torch"] == NO_TORCH:
        if raw["cuda"] != NO_TORCH:
            problems.append(f"{where}: an entry without torch must say cuda = \"none\"")
        return problems
    problems += _torch_problems(where, raw)
    return problems


def _torch_problems(where: str, raw: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if not _VERSION_RE.match(raw["torch"]):
        return [f"{where}: field 'torch' must be a full version like '2.3.0', got {raw['torch']!r}"]
    minor = compat.torch_minor(raw["torch"])
    release = compat.TORCH_RELEASES.get(minor)
    if release is None:
        known = ", ".join(compat.TORCH_RELEASES)
        return [f"{where}: torch {minor} is not in builder/core/compat.py TORCH_RELEASES (known: {known})"]
    if raw["cuda"] not in release.cuda:
        problems.append(
            f"{where}: torch {minor} has no CUDA {raw['cuda']} build; choose {' or '.join(release.cuda)}"
        )
    if raw["python"] not in release.python:
        problems.append(
            f"{where}: torch {minor} has no Python {raw['python']} wheels; choose {', '.join(release.python)}"
        )
    expected_local = "cu" + compat.cuda_tag(raw["cuda"])
    if raw["torch_local"] != expected_local:
        problems.append(
            f"{where}: field 'torch_local' is {raw['torch_local']!r}; CUDA {raw['cuda']} means {expected_local!r}"
        )
    if raw["torch_index"] != "pypi" and not raw["torch_index"].startswith(("http://", "https://", "file:")):
        problems.append(f"{where}: field 'torch_index' must be 'pypi' or an index URL")
    if raw["torch_index"] == "pypi" and raw["cuda"] in release.cuda and raw["cuda"] != release.pypi_cuda:
        url = compat.TORCH_INDEX_URL.format(tag=compat.cuda_tag(raw["cuda"]))
        problems.append(
            f"{where}: PyPI's torch {minor} wheel is the CUDA {release.pypi_cuda} build; "
            f"for CUDA {raw['cuda']} set torch_index = {url!r}"
        )
    return problems


def validate_entries(entries: list[dict[str, Any]], installers: dict[str, dict[str, Any]], path: Path) -> None:
    problems: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            problems.append(f"image #{i + 1}: must be a table")
            continue
        problems += _entry_problems(i, raw)
        if raw.get("python_provider") == "conda" and raw.get("python") not in installers:
            problems.append(
                f"image {raw.get('id')!r}: no [[conda]] installer for Python {raw.get('python')}; "
                f"known: {', '.join(sorted(installers)) or 'none'}"
            )
        ident = raw.get("id")
        if isinstance(ident, str):
            if ident in seen:
                problems.append(f"image {ident!r}: id is used twice")
            seen.add(ident)
    if problems:
        raise SameboxError(
            f"{path}: {len(problems)} problem(s) in the catalog:",
            "fix these entries; see the field list at the top of images/matrix.toml",
            problems,
        )


# --- complete ---------------------------------------------------------------------------------------------------


def complete_entry(raw: dict[str, Any], installers: dict[str, dict[str, Any]], root: Path) -> ImageSpec:
    if raw["torch"] == NO_TORCH:
        cxx11abi = True
    else:
        cxx11abi = compat.TORCH_RELEASES[compat.torch_minor(raw["torch"])].cxx11abi
    conda = installers.get(raw["python"]) if raw["python_provider"] == "conda" else None
    return ImageSpec(
        id=raw["id"],
        torch=raw["torch"],
        torch_local=raw["torch_local"],
        cuda=raw["cuda"],
        cudnn=raw["cudnn"],
        python=raw["python"],
        os=raw["os"],
        base_image=raw["base_image"],
        base_digest=raw.get("base_digest", ""),
        python_provider=raw["python_provider"],
        archs=tuple(sorted(raw["archs"], key=compat.version_tuple)),
        flash_attn=raw["flash_attn"],
        torch_index=raw["torch_index"],
        platforms=tuple(raw["platforms"]),
        cxx11abi=cxx11abi,
        conda_installer=conda["installer"] if conda else "",
        conda_sha256=conda["sha256"] if conda else "",
        root=root,
    )


def read_catalog(path: Path, root: Path) -> list[ImageSpec]:
    """Every entry of the catalog file ``path``, validated and completed against ``root``, in file order."""
    entries, installers = parse_catalog(path)
    validate_entries(entries, installers, path)
    return [complete_entry(raw, installers, root) for raw in entries]


def load_catalog(root: Path | None = None) -> list[ImageSpec]:
    """Every entry of ``root``'s images/matrix.toml (default: this checkout's)."""
    root = root or project_root()
    return read_catalog(catalog_path(root), root)


# --- resolve ----------------------------------------------------------------------------------------------------


def _matches(requested: str | None, actual: str) -> bool:
    """'2.3' matches '2.3.0'; '2.3.0' matches '2.3.0'; None matches anything."""
    if not requested:
        return True
    return actual == requested or actual.startswith(requested + ".")


def _describe(specs: list[ImageSpec]) -> str:
    return "; ".join(f"{s.id} (torch {s.torch_full}, Python {s.python})" for s in specs)


def find_image(image_id: str, catalog: list[ImageSpec]) -> ImageSpec:
    for spec in catalog:
        if spec.id == image_id:
            return spec
    raise SameboxError(f"no catalog image {image_id!r}", "known images: " + ", ".join(s.id for s in catalog))


def resolve_spec(
    torch: str | None,
    cuda: str | None = None,
    python: str | None = None,
    catalog: list[ImageSpec] | None = None,
) -> ImageSpec:
    """TORCH=2.3 [CUDA=12.1] [PYTHON=3.12] -> exactly one catalog ImageSpec, or a SameboxError saying what would."""
    catalog = catalog if catalog is not None else load_catalog()
    if not torch:
        raise SameboxError("TORCH is required", "for example: make image TORCH=2.3 (see `samebox images`)")
    torch = torch.removeprefix("torch").split("+")[0]
    cuda = cuda.removeprefix("cu") if cuda else None
    if cuda and re.fullmatch(r"\d{3}", cuda):
        cuda = f"{cuda[:2]}.{cuda[2:]}"

    by_torch = [s for s in catalog if s.has_torch and _matches(torch, s.torch)]
    if not by_torch:
        versions = sorted({compat.torch_minor(s.torch) for s in catalog if s.has_torch}, key=compat.version_tuple)
        raise SameboxError(
            f"no catalog image has torch {torch}",
            f"choose one of: {', '.join(versions)} (or add an entry to images/matrix.toml)",
        )
    minor = compat.torch_minor(torch)
    release = compat.TORCH_RELEASES.get(minor)
    problems: list[str] = []
    if cuda and release and cuda not in release.cuda:
        in_catalog = sorted({s.cuda for s in by_torch}, key=compat.version_tuple)
        problems.append(f"torch {minor} has no CUDA {cuda} build; choose {' or '.join(release.cuda)} "
                        f"(the catalog has CUDA {', '.join(in_catalog)} for it)")
    if python and release and python not in release.python:
        problems.append(f"torch {minor} has no Python {python} wheels; choose {', '.join(release.python)}")
    if problems:
        raise SameboxError("incompatible request:", "", problems)

    found = [s for s in by_torch if _matches(cuda, s.cuda) and _matches(python, s.python)]
    if not found:
        raise SameboxError(
            f"no catalog image for torch {torch}" + (f" + CUDA {cuda}" if cuda else "")
            + (f" + Python {python}" if python else ""),
            f"images with torch {torch}: {_describe(by_torch)}; add an entry to images/matrix.toml for another",
        )
    if len(found) > 1:
        raise SameboxError(
            f"torch {torch} is ambiguous: {len(found)} catalog images match",
            f"add CUDA= or PYTHON= to pick one: {_describe(found)}",
        )
    return found[0]
