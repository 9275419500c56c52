"""Checks a flash-attn wheel must pass: its file-name tags, the SASS archs `cuobjdump --list-elf` finds in its
extension, whether that SASS runs on the GPUs here, and (torch + GPU present) a numeric check of
flash_attn_varlen_func forward and backward against torch SDPA. The last two are builder/wheels/kernelcheck.py's, which
the self-test uses too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import Version

from builder.core.compat import AGREEMENT_REL_ERROR
from builder.core.environment import Gpu, sm_list
from builder.core.errors import SameboxError
from builder.wheels import kernelcheck
from builder.wheels.kernelcheck import find_cuobjdump as find_cuobjdump  # resolve.py finds the tool through here
from builder.wheels.key import WheelKey

EXTENSION = "flash_attn_2_cuda"


def wheel_tag_problems(wheel: Path, key: WheelKey) -> list[str]:
    """Mismatches between a wheel's file name and the key (name, version, Python tag, linux x86_64)."""
    try:
        name, version, _build, tags = parse_wheel_filename(wheel.name)
    except InvalidWheelFilename as e:
        return [f"{wheel.name}: not a wheel file name ({e})"]
    problems = []
    if name != "flash-attn":
        problems.append(f"{wheel.name}: distribution is {name}, not flash-attn")
    if version.public != Version(key.flash_attn).public:
        problems.append(f"{wheel.name}: version {version.public}, the key wants {key.flash_attn}")
    if not any(t.interpreter == key.python and t.abi == key.python for t in tags):
        problems.append(f"{wheel.name}: tags {sorted(str(t) for t in tags)}, the key wants {key.python}")
    if not any(t.platform.endswith("x86_64") and t.platform.startswith(("linux", "manylinux")) for t in tags):
        problems.append(f"{wheel.name}: not a Linux x86_64 wheel")
    return problems + _metadata_problems(wheel, key)


def _metadata_problems(wheel: Path, key: WheelKey) -> list[str]:
    """What the wheel says inside (.dist-info/WHEEL tags, METADATA version), which a rename cannot change."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = {Path(n).name: zf.read(n).decode(errors="replace") for n in zf.namelist()
                    if n.count("/") == 1 and n.split("/")[0].endswith(".dist-info")
                    and Path(n).name in ("WHEEL", "METADATA")}
    except zipfile.BadZipFile:
        return [f"{wheel.name}: not a zip archive"]
    if set(info) != {"WHEEL", "METADATA"}:
        return [f"{wheel.name}: no .dist-info/WHEEL and METADATA inside"]
    problems = []
    tags = re.findall(r"^Tag: (\S+)", info["WHEEL"], re.M)
    if not any(t.startswith(f"{key.python}-{key.python}-") for t in tags):
        problems.append(f"{wheel.name}: .dist-info/WHEEL tags {tags}, the key wants {key.python}")
    version = re.search(r"^Version: (\S+)", info["METADATA"], re.M)
    if not version or Version(version.group(1)).public != Version(key.flash_attn).public:
        problems.append(f"{wheel.name}: METADATA version {version.group(1) if version else None}, "
                        f"the key wants {key.flash_attn}")
    return problems


def extract_extension(wheel: Path, dest: Path) -> Path:
    """The CUDA extension (flash_attn_2_cuda*.so) from a wheel, unpacked into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if Path(n).name.startswith(EXTENSION) and n.endswith(".so")]
        if len(names) != 1:
            raise SameboxError(f"{wheel.name} holds {len(names)} {EXTENSION} extensions, expected 1",
                               "the wheel is not a flash-attn CUDA build")
        return Path(zf.extract(names[0], dest))


def elf_archs(wheel: Path, cuobjdump: str) -> tuple[str, ...]:
    """The SASS archs in the wheel's extension per `cuobjdump --list-elf`: ('8.0', '9.0')."""
    with tempfile.TemporaryDirectory() as tmp:
        so = extract_extension(wheel, Path(tmp))
        try:
            return kernelcheck.elf_archs(so, cuobjdump)
        except kernelcheck.CuobjdumpError as e:
            raise SameboxError(f"cuobjdump --list-elf failed on {wheel.name}: {e}",
                               "the extension may be damaged; rebuild the wheel") from e


def arch_problems(found: tuple[str, ...], key: WheelKey, exact: bool) -> list[str]:
    """Source builds must hold exactly the key's SASS; official wheels at least the key's archs."""
    want = set(key.archs)
    if exact and set(found) != want or not exact and not want <= set(found):
        relation = "exactly" if exact else "at least"
        return [f"cuobjdump lists {sm_list(found) or 'nothing'}; the key wants {relation} {sm_list(key.archs)}"]
    return []


def gpu_problems(archs: tuple[str, ...], gpus: tuple[Gpu, ...], key: WheelKey) -> list[str]:
    """GPUs here that no SASS in the wheel runs on, each with the command that builds one that does (a GPU whose
    capability is unknown is left to the self-test)."""
    problems = []
    for gpu in gpus:
        cap = gpu.capability
        if cap and not any(cap.runs(a) for a in archs):
            built = sm_list(archs)
            problems.append(
                f"{gpu.name} is {cap.sm} but this flash-attn wheel only has {built}: it would fail "
                f"with 'no kernel image is available'. Rebuild for it: samebox wheel flash-attn --from-env "
                f"--arch {cap} --profile {key.profile}"
            )
    return problems


def verify_wheel(wheel: Path, key: WheelKey, exact_archs: bool, cuobjdump: str | None) -> tuple[str, ...]:
    """Tags and archs, or SameboxError listing what is wrong. Returns the archs cuobjdump found.

    Without cuobjdump the GPU code cannot be checked, and an unchecked wheel never enters the cache."""
    problems = wheel_tag_problems(wheel, key)
    found: tuple[str, ...] = ()
    if not cuobjdump:
        problems.append("cuobjdump not found, so its GPU code cannot be checked: it comes with the CUDA toolkit, next "
                        "to nvcc; put the toolkit's bin/ on PATH or set CUDA_HOME")
    elif not problems:
        found = elf_archs(wheel, cuobjdump)
        problems += arch_problems(found, key, exact_archs)
    if problems:
        raise SameboxError(f"{wheel.name} does not fit key {key.id}:", "it was not added to the cache", problems)
    return found


def numeric_check(wheel: Path, python: str = sys.executable) -> dict[str, object]:
    """Import the wheel's flash_attn (unpacked, not installed) in a child Python and compare varlen fwd+bwd with
    an fp32 SDPA reference; SameboxError when any relative error exceeds AGREEMENT_REL_ERROR."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # run_path, not the file as a script: that would put builder/ (its platform.py) first on sys.path.
        run = f"import runpy; runpy.run_path({kernelcheck.__file__!r}, run_name='__main__')"
        res = subprocess.run([python, "-c", run], capture_output=True, text=True, env=env, cwd=tmp, check=False)
    if res.returncode != 0:
        raise SameboxError(f"numeric check of {wheel.name} could not run", "see the error below",
                           res.stderr.strip().splitlines()[-8:])
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["bound"] = AGREEMENT_REL_ERROR
    bad = [f"{n}: relative error {e:.2e} > {AGREEMENT_REL_ERROR:.0e}" for n, e in result["rel_err"].items()
           if not e <= AGREEMENT_REL_ERROR]
    if bad:
        raise SameboxError(f"{wheel.name} computes wrong attention against torch SDPA:", "do not use it", bad)
    return result
