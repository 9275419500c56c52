"""The project's own dev lock: the environment `make test` and CI install, resolved by uv like the catalog's locks.

Its inputs live in pyproject.toml: the extras ([tool.samebox.dev-lock] names which), the build backend
([build-system] requires: samebox installs itself without build isolation, from the lock's setuptools), and the
CPU build of torch the trainer's tests run on, with the Python the lock is for. ``lock_dev`` resolves them twice:
``lockfiles/dev.txt`` (everything the test suite needs) and ``lockfiles/dev-builder.txt`` (what `make image` needs,
resolved against dev.txt so the two never disagree). Each file carries the catalog locks' header: the command that
regenerates it, the sha256 of its inputs and of its pins; ``check_dev_lock`` recomputes both without network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.core import pyindex
from builder.core.errors import SameboxError
from builder.core.fsutil import sha256_text, write_atomic
from builder.core.settings import project_root
from builder.image.lock import LOCK_PLATFORM, MARKER, check_header, find_uv, uv_version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEV_LOCK = "lockfiles/dev.txt"
BUILDER_LOCK = "lockfiles/dev-builder.txt"
COMMAND = "make lock-dev"
BUILDER_PYTHON_FLOOR = "3.10"  # pyproject.toml's requires-python
KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "uv", "pytest")


@dataclass(frozen=True)
class DevLockInputs:
    python: str  # the interpreter the lock is for: major.minor
    torch: str  # the torch the tests run on, with its local tag ('2.13.0+cpu')
    torch_index: str  # where that build is published
    extras: tuple[str, ...]  # samebox's extras in dev.txt
    builder_extras: tuple[str, ...]  # samebox's extras in dev-builder.txt
    build_requires: tuple[str, ...]  # [build-system] requires
    requirements: dict[str, tuple[str, ...]]  # the project's dependencies and each extra's, as declared

    def sha256(self) -> str:
        return sha256_text(json.dumps({"format": "1", "platform": LOCK_PLATFORM, **self.__dict__}, sort_keys=True,
                                      default=list))


def read_inputs(root: Path | None = None) -> DevLockInputs:
    """pyproject.toml's [tool.samebox.dev-lock] table with what it refers to; a missing key is a SameboxError."""
    root = root or project_root()
    path = root / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SameboxError(f"cannot read {path}: {e}", "restore pyproject.toml from git") from None
    table = data.get("tool", {}).get("samebox", {}).get("dev-lock", {})
    missing = [k for k in ("python", "torch", "torch-index", "extras", "builder-extras") if k not in table]
    if missing:
        raise SameboxError(f"{path} [tool.samebox.dev-lock] lacks {', '.join(missing)}",
                           "restore the table from git: it says what the dev lock is made of")
    project = data["project"]
    extras = project.get("optional-dependencies", {})
    unknown = [e for e in [*table["extras"], *table["builder-extras"]] if e not in extras]
    if unknown:
        raise SameboxError(f"[tool.samebox.dev-lock] names extras pyproject.toml does not define: {', '.join(unknown)}",
                           f"use some of: {', '.join(sorted(extras))}")
    named = sorted(set(table["extras"]) | set(table["builder-extras"]))
    requirements = {"": tuple(project.get("dependencies", ())), **{name: tuple(extras[name]) for name in named}}
    return DevLockInputs(table["python"], table["torch"], table["torch-index"], tuple(table["extras"]),
                         tuple(table["builder-extras"]), tuple(data["build-system"]["requires"]), requirements)


@dataclass(frozen=True)
class DevLockStatus:
    path: Path
    state: str  # fresh, stale, missing
    reason: str = ""


def check_dev_lock(root: Path | None = None) -> list[DevLockStatus]:
    """Both dev lock files against pyproject.toml now (no network, no uv)."""
    root = root or project_root()
    want = read_inputs(root).sha256()
    out = []
    for rel in (DEV_LOCK, BUILDER_LOCK):
        path = root / rel
        if not path.is_file():
            out.append(DevLockStatus(path, "missing", f"no {rel}"))
            continue
        problem = check_header(path.read_text(encoding="utf-8"), want,
                               "pyproject.toml's dependencies, extras or [tool.samebox.dev-lock] changed")
        out.append(DevLockStatus(path, "stale" if problem else "fresh", problem or ""))
    return out


def _header(inputs: DevLockInputs, what: str, uv: str, body: str, target: str) -> str:
    return "\n".join([
        MARKER.replace("`samebox lock`", f"`{COMMAND}`"),
        f"# Regenerate with: {COMMAND}",
        f"# samebox's {what} | {target}",
        f"# resolved by: uv {uv} pip compile --generate-hashes (install: pip install --require-hashes --no-deps -r)",
        f"# inputs-sha256: {inputs.sha256()}",
        f"# content-sha256: {sha256_text(body)}",
        "",
    ])


def _compile(uv: str, root: Path, tmp: Path, inputs: DevLockInputs, requirements: list[str],
             constraints: list[str], find_links: str | None, previous: Path | None, universal: bool = False) -> str:
    req = tmp / "dev.in"
    req.write_text("\n".join(requirements) + "\n")
    out = tmp / "out.txt"
    if previous is not None and previous.is_file():
        shutil.copyfile(previous, out)
    # the builder's lock serves any host Python samebox runs on (markers), the test lock one interpreter and platform
    target = (["--universal", "--python-version", BUILDER_PYTHON_FLOOR] if universal
              else ["--python-version", inputs.python, "--python-platform", LOCK_PLATFORM])
    cmd = [uv, "pip", "compile", str(req), *target, "--generate-hashes", "--no-header", "--quiet", "-o", str(out)]
    for c in constraints:
        cmd += ["-c", c]
    if find_links:
        cmd += ["--find-links", find_links]
    else:
        cmd += ["--extra-index-url", inputs.torch_index, "--index-strategy", "unsafe-best-match"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=pyindex.uv_environment())
    if proc.returncode != 0:
        tail = "\n".join(pyindex.redact(proc.stderr).strip().splitlines()[-25:])
        where = f"--find-links {find_links}" if find_links else inputs.torch_index
        raise SameboxError(f"uv could not lock samebox's dev environment:\n{tail}",
                           f"check pyproject.toml's extras; torch comes from {where} (`make lock-dev "
                           "PIP_FIND_LINKS=DIR` takes a directory holding its wheel); nothing was written")
    return pyindex.redact(out.read_text()).replace(str(req), "pyproject.toml")


def lock_dev(root: Path | None = None, find_links: str | None = None, upgrade: bool = True) -> list[Path]:
    """Resolve dev.txt (the newest releases that fit, unless ``upgrade`` is False) and dev-builder.txt, and write
    both atomically once both resolved."""
    root = root or project_root()
    inputs = read_inputs(root)
    uv = find_uv()
    samebox = f"samebox[{','.join(inputs.extras)}] @ {root.resolve().as_uri()}"
    with tempfile.TemporaryDirectory(prefix="samebox-devlock-") as tmp:
        tmp_dir = Path(tmp)
        pin = tmp_dir / "torch-pin.txt"
        pin.write_text(f"torch=={inputs.torch}\n")
        full = _drop_self(_compile(uv, root, tmp_dir, inputs, [samebox, *inputs.build_requires], [str(pin)],
                                   find_links, None if upgrade else root / DEV_LOCK))
        full_path = tmp_dir / "dev.txt"
        full_path.write_text(full)
        builder = f"samebox[{','.join(inputs.builder_extras)}] @ {root.resolve().as_uri()}"
        small = _drop_self(_compile(uv, root, tmp_dir, inputs, [builder, *inputs.build_requires],
                                    [str(full_path)], find_links, None, universal=True))
    version = uv_version(uv)
    written = []
    test_target = f"torch {inputs.torch} from {inputs.torch_index} | Python {inputs.python} | {LOCK_PLATFORM}"
    for rel, body, what, target in (
            (DEV_LOCK, full, f"dev environment ({', '.join(inputs.extras)})", test_target),
            (BUILDER_LOCK, small, f"builder environment ({', '.join(inputs.builder_extras)})",
             f"Python >={BUILDER_PYTHON_FLOOR}, any platform")):
        body = body.replace(str(pin), "the dev lock's torch pin").replace(str(full_path), DEV_LOCK)
        write_atomic(root / rel, _header(inputs, what, version, body, target) + body)
        written.append(root / rel)
    return written


def _drop_self(body: str) -> str:
    """uv's output without samebox itself (installed editable from the checkout) and its `# via` mentions."""
    kept, skipping = [], False
    for line in body.splitlines(keepends=True):
        if not line.startswith((" ", "#")):
            skipping = line.startswith("samebox")
        if not skipping:
            kept.append(line)
    return "".join(kept)
