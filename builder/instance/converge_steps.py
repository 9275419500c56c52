"""The steps of a setup run, one function each (builder/instance/converge.py plans, counts and runs them in order).

Each step converges one part of the instance and re-checks that part's state before it acts, so a run killed at any
point converges when run again. The interpreter running the steps may not be the one that gets the packages (a
system Python's go to a virtualenv, as in the image): what is installed is asked of that interpreter
(``python -m builder.instance.drift`` with samebox's source on its path), and samebox's own commands run in it
once installed.
The platform's torch and its nvidia-* libraries are never installed, upgraded or downgraded: they are verified.
Standard library only, like builder/instance/converge.py.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.core import settings
from builder.core.environment import NO_TORCH
from builder.core.errors import SameboxError
from builder.core.fsutil import write_atomic
from builder.core.readahead import Prefetch

# What `samebox` step copies of a source checkout to build from (an in-tree build would leave build/ and
# *.egg-info in the checkout), and what its digest covers: a change to any of these reinstalls samebox.
SOURCE_PARTS = settings.SOURCE_PARTS
DIGEST_PARTS = ("pyproject.toml", "builder", "trainer")
DIGEST_PATTERNS = ("*.py", "*.toml", "*.typed", "*.json")


class StepFailed(Exception):
    """A step could not converge its part; the message says what to look at. Exit status 1."""


@dataclass(frozen=True)
class Options:
    """What the user asked for: the command line over SAMEBOX_* variables over the defaults."""

    image: str
    python: str
    offline: bool
    wheelhouse: Path | None
    cache_dir: Path | None
    samebox_src: Path
    root: Path | None
    catalog: Path | None
    lockfile: Path | None
    min_free_mb: int
    flash_attn: bool
    flash_attn_profile: str
    selftest: bool
    state: Path
    venv: Path


@dataclass(frozen=True)
class Match:
    """The instance's platform and the catalog image that replicates it, as the steps need them."""

    image: str
    image_torch: str  # what torch.__version__ reports in the image: '2.3.0+cu121', or 'none'
    provider: str  # the image's python_provider: 'conda' or 'system'
    flash_attn: str  # the image's flash-attn version
    torch: str  # the platform's torch.__version__, or 'none'
    gpus: tuple[str, ...]
    flash_attn2_gpu: bool  # a GPU can run flash-attn 2 (or one is unknown: the wheel resolver decides)
    describe: str
    data_disk: str = ""
    shared_fs: str = ""
    lockfile: Path | None = None  # the image's lock in the catalog's root (None: a standalone script's catalog)


@dataclass(frozen=True)
class Preflight:
    """What converge established before the first step: nothing of it is asked again."""

    match: Match
    root: Path | None
    catalog: Path
    lock_source: Path  # where the lockfile is read
    lockfile: Path  # the lockfile this instance claims afterwards (a given --lockfile is kept in the state dir)
    cache_dir: Path
    free_mb: int
    needs_venv: bool  # a system interpreter without torch: packages go to a virtualenv, as in the image


@dataclass
class Run:
    """One run's state as the steps advance it."""

    opts: Options
    pre: Preflight
    work: Path  # scratch, removed at the end
    python: str  # the interpreter that gets the packages (the python step may switch it to the virtualenv)
    wheel_cache: Path | None = None
    installer: Installer | None = None
    selftest_passed: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # each step's seconds, in order
    selftest_proc: subprocess.Popen | None = None  # the self-test, started beside the fingerprint
    selftest_began: float = 0.0
    selftest_own_s: float | None = None  # the self-test's own wall seconds (most of them spent beside the fingerprint)
    kernel_caches: dict[str, Path] = field(default_factory=dict)  # the compiled-kernel caches env.sh exports
    readahead: Prefetch | None = None  # the libraries the self-test maps, read from the start


def say(text: str) -> None:
    print(f"    {text}")


# --- the target interpreter ---------------------------------------------------------------------------------------


def _with_source(run: Run) -> dict[str, str]:
    """The environment with samebox's source importable: for builder.instance.drift before samebox is installed."""
    outer = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(run.opts.samebox_src) + (os.pathsep + outer if outer else "")}


def _drift(run: Run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([run.python, "-m", "builder.instance.drift", *args], env=_with_source(run),
                          stdout=subprocess.PIPE, text=True)


def _samebox(run: Run, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
    """samebox's CLI as installed in the target environment."""
    return subprocess.run([run.python, "-m", "builder", *args], **kwargs)  # type: ignore[call-overload]


def _python_can(python: str, code: str) -> bool:
    return subprocess.run([python, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


@dataclass(frozen=True)
class Installer:
    """uv when present, else pip; hashes always required, dependencies never resolved (the lock is whole)."""

    name: str
    python: str
    find_links: str
    offline: bool

    @property
    def reinstall(self) -> str:
        return "--reinstall" if self.name == "uv" else "--force-reinstall"

    def install(self, *args: str, quiet: bool = False) -> bool:
        sources = [*(["--find-links", self.find_links] if self.find_links else []),
                   *(["--no-index"] if self.offline else [])]
        if self.name == "uv":
            cmd = ["uv", "pip", "install", "--python", self.python, "--no-deps",
                   *(["--offline"] if self.offline else []), *sources, *args]
        else:
            cmd = [self.python, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *sources, *args]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None).returncode == 0


def _installer(run: Run) -> Installer:
    if run.installer:
        return run.installer
    if shutil.which("uv"):
        name = "uv"
        for pip_var, uv_var in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL")):
            if os.environ.get(pip_var) and not os.environ.get(uv_var):
                os.environ[uv_var] = os.environ[pip_var]
    else:
        name = "pip"
        if not _python_can(run.python, "import pip") and not _python_can(run.python, "import ensurepip; "
                                                                           "ensurepip.bootstrap(default_pip=True)"):
            # a venv made without pip (uv venv): pip's bundled wheel, else nothing to install with
            raise SameboxError(f"{run.python} has no pip, and ensurepip cannot add it; put uv on PATH or install "
                               "pip into that environment")
    managed = ("import os, sys, sysconfig; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists("
               "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))")
    if _python_can(run.python, managed):  # the platform's own interpreter is the environment samebox manages
        os.environ["PIP_BREAK_SYSTEM_PACKAGES"] = os.environ["UV_BREAK_SYSTEM_PACKAGES"] = "1"
    opts = run.opts
    run.installer = Installer(name, run.python, str(opts.wheelhouse or ""), opts.offline)
    return run.installer


# --- steps --------------------------------------------------------------------------------------------------------


def source(run: Run) -> None:
    """samebox's source, and the lockfile this instance will claim."""
    say(f"samebox from {run.opts.samebox_src}")
    pre = run.pre
    if pre.lockfile != pre.lock_source:  # kept beside the fingerprint: `samebox verify` and the self-test read it
        write_atomic(pre.lockfile, pre.lock_source.read_bytes())


def python(run: Run) -> None:
    """The interpreter that gets the packages: the platform's, or a virtualenv made from it."""
    say(run.opts.python)
    if not run.pre.needs_venv:
        return
    venv = run.opts.venv
    venv_python = str(venv / "bin" / "python")
    # The marker is written after `venv` returns: a virtualenv without it was interrupted (maybe inside ensurepip,
    # leaving a half-installed pip) and is made again.
    if not (venv / ".samebox-complete").is_file() or not _python_can(venv_python, "import pip"):
        say(f"creating the virtualenv {venv}")
        shutil.rmtree(venv, ignore_errors=True)
        if subprocess.run([run.opts.python, "-m", "venv", str(venv)]).returncode != 0:
            raise StepFailed(f"could not create the virtualenv {venv} (is python3-venv installed?)")
        (venv / ".samebox-complete").touch()
    run.python = venv_python
    say(f"packages go to the virtualenv {venv}, as in the image")


def platform(run: Run) -> None:
    """What the base image brought, and the catalog image that replicates it (matched before the first step)."""
    say(run.pre.match.describe)
    say(f"image {run.pre.match.image} (torch {run.pre.match.image_torch})")


def env_sh(run: Run) -> str:
    """~/.samebox/env.sh: where the caches live and which image, interpreter and lock this instance has."""
    cache, pre = run.pre.cache_dir, run.pre
    values = [("HF_HOME", cache / "huggingface"), ("PIP_CACHE_DIR", cache / "pip"), ("TORCH_HOME", cache / "torch"),
              ("UV_CACHE_DIR", cache / "uv"), ("SAMEBOX_WHEEL_CACHE", run.wheel_cache),
              ("SAMEBOX_FILE_CHECKS", settings.shared_file_checks(run.wheel_cache)),
              *run.kernel_caches.items(),
              ("SAMEBOX_IMAGE", pre.match.image), ("SAMEBOX_PYTHON", run.python), ("SAMEBOX_LOCKFILE", pre.lockfile)]
    if pre.root:
        values.append(("SAMEBOX_ROOT", pre.root))
    # Quoted for the shell: a path with quotes or a $ in it cannot run code in every new shell.
    return ("# Written by samebox setup.sh: where the caches live. Sourced from ~/.bashrc.\n"
            + "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in values))


def caches(run: Run) -> None:
    """On AutoDL the data disk (or the region's shared disk), never the 30 GB system disk."""
    cache, state = run.pre.cache_dir, run.opts.state
    cache.mkdir(parents=True, exist_ok=True)
    shared = run.pre.match.shared_fs
    run.wheel_cache = settings.wheel_cache(caches=cache, shared_fs=Path(shared) if shared else None)
    # the file-check findings live beside the wheels (region-shared on AutoDL); only a directory that exists is used
    findings = settings.shared_file_checks(run.wheel_cache).parent
    try:
        findings.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only place of the user's: every check hashes again, nothing else changes
        say(f"{findings} cannot be made ({e.strerror}): file-check findings are not kept")
    run.kernel_caches = {}
    for name, folder in settings.kernel_caches(run.wheel_cache).items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only wheel cache of the user's: the library keeps its own default
            say(f"{folder} cannot be made ({e.strerror}): {name} is left as it is")
            continue
        run.kernel_caches[name] = folder
    text = env_sh(run)
    write_atomic(state / "env.sh", text)
    for line in text.splitlines()[1:]:  # what the later steps' commands see, as a new shell would
        key, _, value = line[len("export "):].partition("=")
        os.environ[key] = shlex.split(value)[0]
    bashrc = Path(os.path.expanduser("~")) / ".bashrc"
    line = f'[ -f "{state}/env.sh" ] && . "{state}/env.sh"'
    have = bashrc.read_text().splitlines() if bashrc.is_file() else []
    if line not in have:
        with bashrc.open("a") as fh:
            fh.write(line + "\n")
    say(f"caches on {cache} ({run.pre.free_mb} MiB free); environment in {state / 'env.sh'}")


def torch(run: Run) -> None:
    """Verified against the lock, never installed."""
    match = run.pre.match
    if match.image_torch == NO_TORCH:
        say("this image has no torch")
        return
    checked = _drift(run, "platform", "--lock", str(run.pre.lockfile))
    if checked.returncode == 0:
        say(f"torch {match.torch} and its platform libraries match the lock")
    elif checked.returncode == 1:
        print("samebox setup: warning: the platform's libraries differ from the lock (they are kept as they are):",
              file=sys.stderr)
        print("".join(f"    {p}\n" for p in checked.stdout.splitlines()), end="", file=sys.stderr)
    else:
        raise StepFailed(f"could not check the platform's libraries against {run.pre.lockfile}")


def _plan_packages(run: Run, todo: Path) -> str:
    planned = _drift(run, "plan", "--lock", str(run.pre.lockfile), "--out", str(todo))
    if planned.returncode != 0:
        raise StepFailed("could not read the installed packages")
    return planned.stdout.strip()


def packages(run: Run) -> None:
    """Every locked package but torch, triton and nvidia-*, hash-checked."""
    installer = _installer(run)
    todo = run.work / "todo.txt"
    why = _plan_packages(run, todo)
    requirements = todo.read_text()
    if not requirements.strip():
        say("every locked package is installed and intact")
        return
    print("".join(f"    {line}\n" for line in why.splitlines()), end="")
    installing = run.work / "installing.txt"
    installing.write_text(requirements)
    if not installer.install("--require-hashes", "--only-binary", ":all:", installer.reinstall, "-r", str(installing)):
        raise StepFailed("installing the locked packages failed (see the installer's message above; 'do not match "
                         "the hashes' means a wheel differs from the one locked: a tampered file, or a mirror serving "
                         "another build)")
    left = _plan_packages(run, todo)
    if todo.read_text().strip():
        raise StepFailed(f"still not as locked after installing: {left}")
    count = sum("==" in line for line in requirements.splitlines())
    say(f"(re)installed {count} locked package(s) with {installer.name}")


def source_digest(src: Path) -> str:
    """What a checkout's samebox is made of (a wheel: its sha256). The same value as
    `find pyproject.toml builder trainer -type f \\( -name '*.py' -o ... \\) | LC_ALL=C sort | xargs sha256sum |
    sha256sum`, which earlier setup scripts recorded, so an instance they set up is not reinstalled for nothing."""
    if not src.is_dir():
        return hashlib.sha256(src.read_bytes()).hexdigest()
    found = []
    for part in DIGEST_PARTS:
        top = src / part
        walked = [(str(top.parent), [], [part])] if top.is_file() else os.walk(top)
        for folder, _, files in walked:
            for name in files:
                path = os.path.join(folder, name)
                if any(fnmatch.fnmatchcase(name, p) for p in DIGEST_PATTERNS) and os.path.isfile(path) \
                        and not os.path.islink(path):
                    found.append(os.path.relpath(path, src))
    lines = "".join(f"{hashlib.sha256((src / rel).read_bytes()).hexdigest()}  {rel}\n"
                    for rel in sorted(found, key=os.fsencode))
    return hashlib.sha256(lines.encode()).hexdigest()


def samebox(run: Run) -> None:
    """samebox itself, from its source, without dependencies (they are in the lock)."""
    src, record = run.opts.samebox_src, run.opts.state / "samebox.src"
    digest = source_digest(src)
    recorded = record.read_text().strip() if record.is_file() else ""
    if recorded == digest and _drift(run, "intact", "samebox").returncode == 0:
        say("samebox is installed from this source")
        return
    target = src
    if src.is_dir():  # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
        target = run.work / "src"
        target.mkdir()
        for part in SOURCE_PARTS:
            if (src / part).is_dir():
                shutil.copytree(src / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
            elif (src / part).is_file():
                shutil.copy2(src / part, target / part)
    # Build with the interpreter's own setuptools when it can build wheels (>= 70.1, or with `wheel`); else in an
    # isolated build environment, which takes setuptools from the index or, offline, from the wheelhouse.
    can_build = _python_can(run.python, "import setuptools.command.bdist_wheel") or \
        _python_can(run.python, "import wheel.bdist_wheel")
    installer = _installer(run)
    if not installer.install(*(["--no-build-isolation"] if can_build else []), installer.reinstall, str(target),
                             quiet=True):
        raise StepFailed(f"pip could not install samebox from {src} (offline, the wheelhouse needs a setuptools "
                         "wheel when the interpreter has no setuptools >= 70.1)")
    write_atomic(record, digest + "\n")
    say(f"installed samebox from {src}")


def flash_attn(run: Run) -> None:
    """A wheel matching this torch, CUDA, ABI and GPU, from the wheel resolver (cache, release, build)."""
    match, opts = run.pre.match, run.opts
    if match.image_torch == NO_TORCH:
        say("skipped: this image has no torch")
    elif not match.gpus:
        say("skipped: no GPU on this instance (re-run setup.sh on a GPU instance to add it)")
    elif not match.flash_attn2_gpu:
        say(f"skipped: flash-attn 2 needs Ampere (sm80) or newer, this instance has {', '.join(match.gpus)}; the "
            "trainer uses SDPA")
    elif _drift(run, "intact", "flash-attn", "--version", match.flash_attn).returncode == 0:
        say(f"flash-attn {match.flash_attn} is installed")
    else:
        dest = run.work / "fa"
        with (run.work / "fa.json").open("w") as report:
            resolved = _samebox(run, "wheel", "flash-attn", "--from-env", "--profile", opts.flash_attn_profile,
                                "--cache", str(run.wheel_cache), "--dest", str(dest),
                                *(["--offline"] if opts.offline else []), "--json", stdout=report)
        wheels = sorted(dest.glob("*.whl")) if resolved.returncode == 0 else []
        if not wheels:
            raise StepFailed("the wheel resolver found no flash-attn wheel (pass --no-flash-attn to go on without "
                             "it)")
        installer = _installer(run)
        if not installer.install(installer.reinstall, *map(str, wheels)):
            raise StepFailed("installing the flash-attn wheel failed")
        say(f"installed {', '.join(w.name for w in wheels)}")


def wants_selftest(opts: Options, pre: Preflight) -> bool:
    """The self-test checks GPUs: planned only where there is one, unless --no-selftest."""
    return opts.selftest and bool(pre.match.gpus)


SELFTEST = ("selftest", "--quick", "--reuse", "all")


def start_selftest(run: Run) -> None:
    """The self-test in the background, its output into files: it and the fingerprint both only read the environment
    the steps before them finished, so the self-test's seconds of imports and GPU checks pass while the fingerprint
    hashes files. The selftest step waits for it and prints what it said."""
    out, err = (run.work / "selftest.out").open("wb"), (run.work / "selftest.err").open("wb")
    with out, err:
        run.selftest_began = time.monotonic()
        run.selftest_proc = subprocess.Popen([run.python, "-m", "builder", *SELFTEST], stdout=out, stderr=err)


def _lower_priority() -> None:
    try:
        os.nice(10)
    except OSError:
        pass


def stop_background(run: Run) -> None:
    """A step failed or the run was interrupted: the background self-test does not outlive setup."""
    proc, run.selftest_proc = run.selftest_proc, None
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fingerprint(run: Run) -> None:
    if wants_selftest(run.opts, run.pre) and run.selftest_proc is None:
        start_selftest(run)
        say("the self-test runs beside it")
    out = run.opts.state / "fingerprint.json"
    # Beside the self-test, the hashing threads yield to it (they would fill every core): both finish sooner.
    beside = {"preexec_fn": _lower_priority} if run.selftest_proc is not None else {}
    if _samebox(run, "fingerprint", "-o", str(out), **beside).returncode != 0:
        raise StepFailed("samebox fingerprint failed")
    say(f"fingerprint in {out}")


def selftest(run: Run) -> None:
    """The quick self-test (started beside the fingerprint); a re-run on the same boot, GPUs and environment as one
    that passed says so and tests nothing (the trainer's preflight still re-runs the health, load and accuracy checks
    before each job)."""
    if run.selftest_proc is None:
        start_selftest(run)
    proc = run.selftest_proc
    assert proc is not None
    rc = proc.wait()
    run.selftest_proc = None
    run.selftest_own_s = round(time.monotonic() - run.selftest_began, 2)
    sys.stdout.write((run.work / "selftest.out").read_text(errors="replace"))
    sys.stdout.flush()
    sys.stderr.write((run.work / "selftest.err").read_text(errors="replace"))
    if rc != 0:
        raise StepFailed("the GPU self-test found problems (see above)")
    print(f"selftest passed ({run.selftest_own_s:.1f} s, beside the fingerprint)")
    run.selftest_passed = True
