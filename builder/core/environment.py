"""The instance as it is: probed once, then passed to everything that needs a fact about it.

``Environment.probe()`` reads the interpreter, torch (version, local tag, CUDA, cuDNN, C++ ABI, compiled archs and,
when asked, the GPUs torch sees), the driver and GPUs (NVML, else nvidia-smi), the rental platform's markers and,
when asked, the installed distributions. Setup, verify, fingerprint, check-gpu, the wheel resolver and the self-test
take the result; none of them probes on its own. A compute capability is a ``Capability`` everywhere.

Standard library only: the setup script runs this on the platform's bare Python before anything is installed.
torch and nvidia-ml-py are imported lazily and may be absent or broken (that is a fact, not a crash).
AutoDL's paths live in builder/core/settings.py; /etc/profile.d/autodl.env.sh holds a panel token and is never read.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import total_ordering
from pathlib import Path
from typing import Any

from builder.core import settings
from builder.core.fsutil import read_remembered, remember

NO_TORCH = "none"

# AutoDL: the network accelerator script, the per-instance data disk and the region-shared file system.


# --- compute capability -----------------------------------------------------------------------------------------

_CAPABILITY_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+)|(\d))a?$")


@total_ordering
@dataclass(frozen=True)
class Capability:
    """A GPU's compute capability. Parses every spelling met in the field ('9.0', '90', 'sm_90', [9, 0], (9, 0),
    '12.0', '120', 'sm_100a'); prints as '9.0' (``str``), 'sm_90' (``sm``) or '90' (``digits``)."""

    major: int
    minor: int

    @classmethod
    def parse(cls, value: Capability | str | list[int] | tuple[int, int]) -> Capability:
        if isinstance(value, Capability):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return cls(int(value[0]), int(value[1]))
        if isinstance(value, str):
            found = _CAPABILITY_RE.match(value.strip())
            if found:
                if found.group(2) is not None:  # '9.0'
                    return cls(int(found.group(1)), int(found.group(2)))
                digits = found.group(1) + found.group(3)  # '90', '120', 'sm_100'
                return cls(int(digits[:-1]), int(digits[-1]))
        raise ValueError(f"{value!r} is not a compute capability; write it like 8.0, 8.6, 9.0, 12.0")

    @classmethod
    def maybe(cls, value: Any) -> Capability | None:
        """``parse``, or None for an unknown or empty value."""
        try:
            return cls.parse(value) if value not in (None, "") else None
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def __lt__(self, other: Capability) -> bool:
        return (self.major, self.minor) < (other.major, other.minor)

    @property
    def digits(self) -> str:
        return f"{self.major}{self.minor}"

    @property
    def sm(self) -> str:
        return f"sm_{self.digits}"

    def as_list(self) -> list[int]:
        return [self.major, self.minor]

    def runs(self, built: Capability | str) -> bool:
        """Whether SASS built for ``built`` runs on a GPU of this capability (same major, minor not above)."""
        built = Capability.parse(built)
        return built.major == self.major and built.minor <= self.minor


def sm_list(archs: tuple[str, ...] | list[str], sep: str = ", ") -> str:
    """'8.0', '9.0' -> 'sm_80, sm_90': how messages name compiled architectures."""
    return sep.join(Capability.parse(a).sm for a in archs)


# --- facts ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU as the driver lists it. ``capability`` is None where only the name is known and no table has it."""

    name: str
    capability: Capability | None = None
    memory_mib: int | None = None


@dataclass(frozen=True)
class TorchDevice:
    """A GPU as torch sees it (in CUDA_VISIBLE_DEVICES order)."""

    name: str
    capability: Capability
    total_memory: int
    multi_processor_count: int


@dataclass(frozen=True)
class TorchBuild:
    """torch as it reports itself. ``error`` is set (and the rest empty) when torch is installed but does not
    import. ``devices`` is filled only when the probe was asked for them (it initialises CUDA)."""

    version: str = NO_TORCH  # torch.__version__, '2.3.0+cu121'
    cuda: str | None = None  # torch.version.cuda; None for a CPU build
    cudnn: int | None = None
    cxx11abi: bool = True
    arch_list: tuple[str, ...] = ()  # 'sm_90', 'compute_90': the build's arch flags, sorted
    cuda_available: bool | None = None  # None: not asked
    devices: tuple[TorchDevice, ...] = ()
    import_s: float = 0.0
    error: str = ""

    @property
    def local(self) -> str:
        """'cu121' of '2.3.0+cu121'; '' for a build without a local tag."""
        return self.version.partition("+")[2]

    @property
    def public(self) -> str:
        return self.version.partition("+")[0]

    @property
    def cuda_minor(self) -> str | None:
        """'12.1' of torch.version.cuda '12.1' or '12.1.105'."""
        return ".".join(self.cuda.split(".")[:2]) if self.cuda else None

    def sass(self) -> tuple[Capability, ...]:
        """The capabilities torch carries SASS for."""
        return tuple(sorted(Capability.parse(a) for a in self.arch_list if a.startswith("sm_")))


@dataclass(frozen=True)
class Rental:
    """The rental platform's markers: AutoDL today (its turbo script, AutoDLRegion, the data disks)."""

    autodl: bool = False
    region: str = ""
    data_disk: str = ""
    shared_fs: str = ""

    def describe(self) -> str:
        return ("AutoDL" + (f" ({self.region})" if self.region else "")) if self.autodl else ""


@dataclass(frozen=True)
class Environment:
    """Everything samebox needs to know about the instance, probed once (``probe``) or built by hand in tests."""

    python: str  # major.minor
    python_full: str
    executable: str
    torch: TorchBuild | None = None  # None: torch is not installed
    gpus: tuple[Gpu, ...] = ()
    driver: str = ""
    rental: Rental = field(default_factory=Rental)
    distributions: tuple[tuple[str, str], ...] = ()  # (canonical name, version), sorted; filled when asked
    notes: tuple[str, ...] = ()

    @classmethod
    def probe(cls, *, torch: bool = True, torch_devices: bool = False, gpus: bool = True,
              distributions: bool = False, rental: Rental | None = None) -> Environment:
        """The environment of the interpreter running this. Each part can be left out where it is not needed
        (importing torch takes seconds; ``torch_devices`` initialises CUDA); ``rental``: the rental facts where the
        caller probed them already (setup needs them before torch's report, to find the region's copy)."""
        build = probe_torch(devices=torch_devices) if torch else None
        inventory, driver = probe_gpus() if gpus else ((), "")
        notes = (f"torch is installed but does not import: {build.error}",) if build and build.error else ()
        return cls(
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            python_full=".".join(str(v) for v in sys.version_info[:3]),
            executable=sys.executable,
            torch=build,
            gpus=inventory,
            driver=driver,
            rental=rental or probe_rental(),
            distributions=tuple(sorted((name, d.version) for name, d in installed_distributions().items()))
            if distributions else (),
            notes=notes,
        )

    @property
    def torch_version(self) -> str:
        """torch.__version__, or 'none' when torch is absent or broken."""
        return self.torch.version if self.torch and not self.torch.error else NO_TORCH

    @property
    def torch_cuda(self) -> str:
        return (self.torch.cuda if self.torch and self.torch.cuda else None) or NO_TORCH

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    def capabilities(self) -> tuple[Capability, ...]:
        """The GPUs' capabilities: the driver's list, else what torch saw."""
        caps = tuple(g.capability for g in self.gpus if g.capability)
        if not caps and self.torch:
            caps = tuple(d.capability for d in self.torch.devices)
        return caps

    def describe(self) -> str:
        parts = [f"Python {self.python_full}", f"torch {self.torch_version}"]
        if self.torch_cuda != NO_TORCH:
            parts.append(f"CUDA {self.torch_cuda}")
        parts.append(", ".join(g.name for g in self.gpus) if self.gpus else "no GPU")
        if self.rental.autodl:
            parts.append(self.rental.describe())
        return " / ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for gpu in d["gpus"]:
            gpu["capability"] = str(Capability(**gpu["capability"])) if gpu["capability"] else None
        if d["torch"]:
            for dev in d["torch"]["devices"]:
                dev["capability"] = str(Capability(**dev["capability"]))
        d["torch_version"] = self.torch_version
        return d


# --- probes -----------------------------------------------------------------------------------------------------


TORCH_BUILD_FILE = "torch-build.json"


NATIVE_REQUIREMENTS = ("nvidia-", "triton", "pytorch-triton", "cuda-")


def _torch_keys() -> tuple[str | None, str | None]:
    """(instance key, clone key) of this interpreter and its installed torch, both from one look at the stat of the
    RECORDs of torch and of the native libraries it requires (the nvidia-* libraries, triton, cuda-*: which cuDNN
    loads), and the loader's variables; (None, None) where torch has no RECORD (a source tree on sys.path): then
    nothing is remembered. Its pure-Python requirements (filelock, fsspec, sympy, ...) are left out: setup reinstalls
    them at the lock's versions, which changes nothing of the report. So a requirement broken after the report was
    kept (torch no longer imports) is not seen here: the report describes the build; the self-test, the trainer and
    `samebox verify` import torch or check every locked package's files, and say so. The clone key leaves the inode
    out: clones of one image share it (size and mtime, as the file-check findings are kept)."""
    import importlib.util

    try:
        dist = md.distribution("torch")
        where = Path(str(dist.locate_file("")))
        spec = importlib.util.find_spec("torch")
        # The torch that imports must be the one the RECORD belongs to (not another on PYTHONPATH).
        if spec is None or spec.origin is None or Path(spec.origin).resolve() != \
                (where / "torch" / "__init__.py").resolve():
            return None, None
        parts = [sys.executable, str(where), *(os.environ.get(v, "") for v in ("LD_LIBRARY_PATH", "LD_PRELOAD"))]
        clone = list(parts)
        required = {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0] for r in dist.requires or []}
        names = ["torch", *sorted(r for r in required if canonical_name(r).startswith(NATIVE_REQUIREMENTS))]
        for name in names:
            try:
                record = Path(dist_dir(md.distribution(name))) / "RECORD"
                st = record.stat()
            except (md.PackageNotFoundError, OSError):
                parts.append(f"{name}:-")
                clone.append(f"{name}:-")
                continue
            clone.append(f"{record}:{st.st_size}:{st.st_mtime_ns}")
            parts.append(f"{clone[-1]}:{st.st_ino}")
    except (md.PackageNotFoundError, OSError, ValueError):
        return None, None
    if parts[-len(names)].endswith(":-"):
        return None, None  # torch without a RECORD
    return "|".join(parts), "|".join(clone)


SHARED_TORCH_BUILDS = 16  # reports kept in the region-shared file (one per platform image and interpreter)


def _shared_builds_path() -> Path | None:
    """The region-shared torch reports, beside the file-check findings setup.sh points $SAMEBOX_FILE_CHECKS at (a
    clone or a second instance of the region starts with an empty state but the same torch); None where that variable
    is unset (the findings live in the state, and so does the report)."""
    value = settings.get("FILE_CHECKS")
    return Path(value).with_name("torch-builds.json") if value else None


def _build_from(b: Any) -> TorchBuild | None:
    try:
        return TorchBuild(version=str(b["version"]), cuda=b["cuda"], cudnn=b["cudnn"], cxx11abi=bool(b["cxx11abi"]),
                          arch_list=tuple(b["arch_list"]), import_s=0.0)
    except (KeyError, TypeError, AttributeError):
        return None


def _build_dict(build: TorchBuild) -> dict:
    return {"version": build.version, "cuda": build.cuda, "cudnn": build.cudnn, "cxx11abi": build.cxx11abi,
            "arch_list": list(build.arch_list)}


def _remembered_build(key: str | None, clone_key: str | None) -> TorchBuild | None:
    """The report of this torch: the instance's own (its RECORDs' stat, inode included: ``key``), else the region's
    (a clone of the same image: their size and mtime, ``clone_key``), which is then kept in the instance's state too."""
    if key is None or "torch" in sys.modules:
        return None  # torch already in: asking it costs nothing
    data = read_remembered(settings.state_dir() / TORCH_BUILD_FILE)
    shared = _shared_builds_path()
    if data.get("key") == key:
        build = _build_from(data.get("build"))
        if build is not None and shared is not None:
            _share_build(shared, clone_key, build)  # the region learns it from the first instance that has it
        return build
    if shared is None:
        return None
    entries = read_remembered(shared).get("builds")
    found = [e for e in entries if isinstance(e, dict) and e.get("key") == clone_key] \
        if isinstance(entries, list) else []
    build = _build_from(found[0].get("build")) if found else None
    if build is not None:
        remember(settings.state_dir() / TORCH_BUILD_FILE, {"key": key, "build": _build_dict(build)})
    return build


def _share_build(shared: Path, clone_key: str | None, build: TorchBuild) -> None:
    """Keep ``build`` in the region-shared file under this torch's clone key where it is new there: the newest entry
    first, the SHARED_TORCH_BUILDS most recently added kept."""
    if clone_key is None:
        return
    entries = read_remembered(shared).get("builds")
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    entry = {"key": clone_key, "build": _build_dict(build)}
    if entry in entries:
        return  # known: the shared file is written only when a report is new to it
    kept = [e for e in entries if e.get("key") != clone_key]
    remember(shared, {"builds": [entry, *kept][:SHARED_TORCH_BUILDS]})


def _remember_build(key: str | None, clone_key: str | None, build: TorchBuild) -> None:
    if key is None or build.error:
        return
    remember(settings.state_dir() / TORCH_BUILD_FILE, {"key": key, "build": _build_dict(build)})
    shared = _shared_builds_path()
    if shared is not None:
        _share_build(shared, clone_key, build)


def probe_torch(devices: bool = False) -> TorchBuild | None:
    """torch's own report, or None when it is not installed. The only place samebox imports torch to ask it
    what it is. Without ``devices`` the report of an unchanged torch (the same interpreter and RECORD) is read from
    $SAMEBOX_STATE/torch-build.json, or for a clone of the same image from the region-shared torch-builds.json beside
    $SAMEBOX_FILE_CHECKS: importing torch takes seconds, and setup, fingerprint and verify each ask."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    key, clone_key = (None, None) if devices else _torch_keys()
    remembered = _remembered_build(key, clone_key)
    if remembered is not None:
        return remembered
    start = time.perf_counter()
    try:
        import torch
    except Exception as e:  # a broken torch is a finding, not a crash
        return TorchBuild(error=f"{type(e).__name__}: {e}")
    import_s = round(time.perf_counter() - start, 3)
    native = getattr(torch, "_C", None)
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    arch_list: tuple[str, ...] = ()
    cudnn = None
    if cuda:
        # The build's own flags, not torch.cuda.get_arch_list(): that one is empty without a GPU, and an image
        # built on a GPU-less host must report what an instance reports.
        if hasattr(native, "_cuda_getArchFlags"):
            arch_list = tuple(sorted(str(native._cuda_getArchFlags()).split()))
        try:
            cudnn = torch.backends.cudnn.version()
        except Exception:
            cudnn = None
    build = TorchBuild(version=str(getattr(torch, "__version__", NO_TORCH)), cuda=cuda, cudnn=cudnn,
                       cxx11abi=bool(getattr(native, "_GLIBCXX_USE_CXX11_ABI", True)), arch_list=arch_list,
                       import_s=import_s)
    if not devices:
        _remember_build(key, clone_key, build)
        return build
    available = bool(cuda) and torch.cuda.is_available()
    seen = []
    if available:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            seen.append(TorchDevice(p.name, Capability(p.major, p.minor), int(p.total_memory),
                                    int(p.multi_processor_count)))
    return replace(build, cuda_available=available, devices=tuple(seen))


def probe_gpus() -> tuple[tuple[Gpu, ...], str]:
    """The GPUs and driver version: NVML when nvidia-ml-py is present, else nvidia-smi, else none."""
    from builder.core import nvml

    found = nvml.inventory()
    if found and not found.get("error"):
        return tuple(Gpu(g["name"], Capability.maybe(g["compute_capability"]), g["memory_mib"])
                     for g in found["gpus"]), found["driver"] or ""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return (), ""
    # compute_cap is a query field of drivers from 2021 on; an older nvidia-smi refuses it, so ask again without.
    for fields in ("name,driver_version,memory.total,compute_cap", "name,driver_version,memory.total"):
        try:
            out = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
        listed = []
        for row in rows:
            cap = Capability.maybe(row[3]) if len(row) > 3 else None
            memory = int(row[2]) if len(row) > 2 and row[2].isdigit() else None
            listed.append(Gpu(row[0], cap or name_capability(row[0]), memory))
        return tuple(listed), (rows[0][1] if rows and len(rows[0]) > 1 else "")
    return (), ""


def name_capability(name: str) -> Capability | None:
    """The capability builder/core/compat.py's table gives a GPU name, or None."""
    from builder.core import compat

    found = compat.gpu_capability(name)
    return Capability.parse(found[0]) if found else None


def probe_rental() -> Rental:
    region = os.environ.get("AutoDLRegion", "")
    return Rental(
        autodl=settings.AUTODL_TURBO.exists() or bool(region),
        region=region,
        data_disk=str(settings.AUTODL_DATA_DISK) if settings.AUTODL_DATA_DISK.is_dir() else "",
        shared_fs=str(settings.AUTODL_SHARED_FS) if settings.AUTODL_SHARED_FS.is_dir() else "",
    )


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_dir(dist: md.Distribution) -> str:
    return str(getattr(dist, "_path", ""))


def installed_distributions(path: list[str] | None = None) -> dict[str, md.Distribution]:
    """Canonical name -> the distribution Python would import (first on sys.path, or ``path``, wins, as importlib
    does). pip's leftovers from an interrupted run ('~umpy-1.26.dist-info') are not distributions."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions(**({"path": path} if path is not None else {})):
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or Path(dist_dir(dist)).name.startswith("~"):
            continue
        found.setdefault(canonical_name(name), dist)
    return found
