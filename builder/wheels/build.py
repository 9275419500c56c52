"""Source build of one flash-attn wheel from its hash-checked PyPI sdist, for exactly the key's archs and profile.

Plan (pure: numbers in, settings out) -> toolchain check -> sdist -> setup.py bdist_wheel with an ETA up front and
progress (objects done / total) while ninja runs. The source tree and ninja's state live in the cache's build area
under the key's id, so a killed build resumes where it stopped when run again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.core import compat, pyindex
from builder.core.environment import Capability, Environment
from builder.core.errors import SameboxError
from builder.core.fsutil import sha256_file
from builder.wheels.key import WheelKey, release_facts

Say = Callable[[str], None]
_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")
_NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")
BUILD_MODULES = ("setuptools", "wheel", "packaging")
CUDA_DEFAULT = Path("/usr/local/cuda")


@dataclass(frozen=True)
class BuildPlan:
    key: WheelKey
    jobs: int
    nvcc_threads: int
    objects: int
    eta_s: float
    env: dict[str, str]  # set on top of the caller's environment
    command: tuple[str, ...]
    cores: int
    free_ram_gb: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {"MAX_JOBS": self.jobs, "NVCC_THREADS": self.nvcc_threads, "objects": self.objects,
                "eta_s": round(self.eta_s), "env": dict(sorted(self.env.items())), "command": list(self.command),
                "cores": self.cores, "free_ram_gb": round(self.free_ram_gb, 1), "notes": list(self.notes)}


def free_ram_gb(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """MemAvailable, capped by the container's cgroup limit (/proc/meminfo shows the host's RAM in containers,
    as on AutoDL: a build sized from it gets OOM-killed)."""
    available = None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if available is None:
        raise SameboxError(f"{meminfo} has no MemAvailable line", "set MAX_JOBS yourself")
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (cgroup / limit_file).read_text().strip()
            usage = int((cgroup / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            available = min(available, int(limit) - usage)
        break
    return max(available, 0) / 2**30


def cpu_count(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def job_count(cores: int, ram_gb: float, nvcc_threads: int) -> int:
    """MAX_JOBS: one nvcc job per core and per ~4 GB of free RAM (per arch it compiles at once)."""
    per_job = compat.FLASH_ATTN_JOB_RAM_GB * nvcc_threads
    if ram_gb < per_job:
        raise SameboxError(
            f"too little free RAM for one flash-attn compile job: {ram_gb:.1f} GB free, one job needs "
            f"~{per_job:.0f} GB",
            "free memory (stop other jobs), add swap, use fewer --arch, or take a wheel from a machine that has one",
        )
    return max(1, min(cores // nvcc_threads, int(ram_gb // per_job)))


def _flags(existing: str | None, defines: tuple[str, ...]) -> str:
    return " ".join(([existing] if existing else []) + [f"-D{d}" for d in defines])


def plan_build(key: WheelKey, cores: int, ram_gb: float, base_env: dict[str, str] | None = None,
               done_objects: int = 0, python: str = sys.executable) -> BuildPlan:
    """Settings for building ``key`` on a machine with ``cores`` and ``ram_gb`` free; nothing is run."""
    base_env = os.environ if base_env is None else base_env
    release = release_facts(key.flash_attn)
    notes: list[str] = []
    if not release.arch_env and key.archs != release.release_archs:
        raise SameboxError(
            f"flash-attn {key.flash_attn}'s setup.py always builds {' + '.join(release.release_archs)}; "
            f"it cannot target {', '.join(key.archs)}",
            "use --arch " + " --arch ".join(release.release_archs) + ", or a flash-attn that honours "
            "FLASH_ATTN_CUDA_ARCHS: " + ", ".join(v for v, r in compat.FLASH_ATTN_RELEASES.items() if r.arch_env),
        )
    threads = min(len(key.archs), 4)
    jobs = job_count(cores, ram_gb, threads)
    defines = compat.FLASH_ATTN_PROFILES[key.profile]
    env = {
        "FLASH_ATTENTION_FORCE_BUILD": "TRUE",
        "FLASH_ATTN_CUDA_ARCHS": ";".join(key.sm_codes),
        "FLASH_ATTN_LOCAL_VERSION": key.local_version,
        "MAX_JOBS": str(jobs),
        "NVCC_THREADS": str(threads),
    }
    if defines:
        # CPPFLAGS reaches the host compiler (flash_api.cpp keeps its TORCH_CHECK guards); nvcc reads
        # NVCC_APPEND_FLAGS itself for every .cu file (static_switch.h compiles the variants out).
        env["CPPFLAGS"] = _flags(base_env.get("CPPFLAGS"), defines)
        env["NVCC_APPEND_FLAGS"] = _flags(base_env.get("NVCC_APPEND_FLAGS"), defines)
    if done_objects:
        notes.append(f"resuming: {done_objects} of {release.objects} objects already compiled")
    remaining = max(release.objects - done_objects, 0)
    per_object = compat.FLASH_ATTN_OBJECT_SECONDS[key.profile] * len(key.archs) / threads
    # The work spread over the jobs, plus the tail where fewer objects than jobs are left (measured at 16 jobs:
    # slim 519 s against a 457 s floor, lean 383 s against 349 s; bench/results/flash_attn_build.json).
    eta = max(remaining * per_object / jobs + 0.6 * per_object, per_object) if remaining else 0.0
    command = (python, "setup.py", "bdist_wheel", "--dist-dir", "dist")
    return BuildPlan(key, jobs, threads, release.objects, eta, env, command, cores, ram_gb, tuple(notes))


# --- toolchain -------------------------------------------------------------------------------------------------


def find_nvcc(env: dict[str, str]) -> Path | None:
    """Where torch's cpp_extension will look: $CUDA_HOME/bin/nvcc, then PATH, then /usr/local/cuda."""
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return Path(found)
    fallback = CUDA_DEFAULT / "bin" / "nvcc"
    return fallback if fallback.is_file() else None


def nvcc_version(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    m = _NVCC_RELEASE.search(out)
    if not m:
        raise SameboxError(f"{nvcc} --version did not say its release", "check that nvcc runs: nvcc --version")
    return int(m.group(1)), int(m.group(2))


def check_toolchain(key: WheelKey, here: Environment, env: dict[str, str], python: str = sys.executable) -> list[str]:
    """Every reason this machine cannot build ``key`` (empty list: it can). Returns notes on success."""
    problems: list[str] = []
    build = here.torch
    mine = {"torch": here.torch_version, "cuda": (build.cuda_minor if build else None) or "none",
            "python": here.python_tag, "cxx11abi": build.cxx11abi if build else True}
    for name, have in mine.items():
        if getattr(key, name) != have:
            problems.append(f"the key wants {name} {getattr(key, name)} but this Python ({python}) has {have}; "
                            "build inside the target environment")
    if here.torch_cuda == "none":
        problems.append("torch here is a CPU build: flash-attn needs a CUDA build of torch")
    nvcc = find_nvcc(env)
    if nvcc is None:
        problems.append(f"nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): install the CUDA {key.cuda} toolkit "
                        f"(e.g. apt-get install cuda-nvcc-{key.cuda.replace('.', '-')}) or use a *-devel image")
    else:
        major, minor = nvcc_version(nvcc)
        if str(major) != key.cuda.split(".")[0]:
            problems.append(f"{nvcc} is CUDA {major}.{minor} but torch is built for CUDA {key.cuda}: install the "
                            f"CUDA {key.cuda} toolkit and put its bin/ first on PATH (or set CUDA_HOME)")
        for arch in key.archs:
            need = compat.FLASH_ATTN_BUILD_ARCHS[arch]
            if compat.version_tuple(f"{major}.{minor}") < compat.version_tuple(need):
                problems.append(f"{Capability.parse(arch).sm} needs nvcc >= {need}; {nvcc} is {major}.{minor}")
    if not ninja_path(env, python):
        problems.append("ninja not found: pip install ninja (without it the build runs one file at a time)")
    missing = [m for m in BUILD_MODULES if not _importable(python, m)]
    if missing:
        problems.append(f"{python} lacks {', '.join(missing)} (setup.py needs them): pip install {' '.join(missing)}")
    return problems


def ninja_path(env: dict[str, str], python: str) -> str | None:
    """ninja on PATH, next to the Python, or inside the `ninja` pip package (its bin dir may not be on PATH)."""
    found = shutil.which("ninja", path=env.get("PATH")) or shutil.which("ninja", path=str(Path(python).parent))
    if found or python != sys.executable:
        return found
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    return shutil.which("ninja", path=str(getattr(ninja, "BIN_DIR", "")))


def _importable(python: str, module: str) -> bool:
    if python == sys.executable:
        import importlib.util
        return importlib.util.find_spec(module) is not None
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


# --- sdist -------------------------------------------------------------------------------------------------------


def _fetch_sdist(url: str, sha256: str, dest: Path, say: Say) -> str:
    """Download the sdist through the configured index (a PIP_INDEX_URL mirror serves the same file by hash),
    with the environment's CA and retries; returns where it came from."""
    try:
        url = pyindex.simple_files(pyindex.default_index(), "flash-attn").get(sha256, url)
    except OSError:
        pass  # the index page is only a way to find a mirror's copy: the PyPI file URL still works
    say(f"downloading {pyindex.redact(url)}")
    try:
        body, _ = pyindex.http_get(url, timeout=120)
    except OSError as e:
        raise SameboxError(f"downloading the flash-attn sdist failed: {pyindex.redact(str(e))}",
                           "check the network or PIP_INDEX_URL, or download it elsewhere and pass --sdist PATH") from e
    dest.write_bytes(body)
    return pyindex.redact(url)


def fetch_sdist(version: str, dest_dir: Path, given: Path | None, offline: bool, say: Say) -> Path:
    """The sdist for ``version`` in ``dest_dir``, its sha256 checked against builder/core/compat.py."""
    release = release_facts(version)
    name = release.sdist_url.rsplit("/", 1)[1]
    dest = dest_dir / name
    dest_dir.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and sha256_file(dest) == release.sdist_sha256:
        return dest
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=dest_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if given is not None:
            if not given.is_file():
                raise SameboxError(f"--sdist {given}: no such file", f"download {release.sdist_url}")
            shutil.copyfile(given, tmp)
            origin = str(given)
        elif offline:
            raise SameboxError(f"--offline and no sdist for flash-attn {version}",
                               f"pass --sdist PATH (from {release.sdist_url}) or drop --offline")
        else:
            origin = _fetch_sdist(release.sdist_url, release.sdist_sha256, tmp, say)
        actual = sha256_file(tmp)
        if actual != release.sdist_sha256:
            raise SameboxError(
                f"flash-attn {version} sdist from {origin} has sha256 {actual}; PyPI publishes "
                f"{release.sdist_sha256}",
                "refusing to build it: download it again from PyPI (a mirror may have altered it)",
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def prepare_source(sdist: Path, build_dir: Path) -> Path:
    """Unpacked sources under ``build_dir``/src, kept between runs (ninja's state lives in src/*/build)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    src_root = build_dir / "src"
    marker = src_root / ".sdist-sha256"
    sha = sha256_file(sdist)
    if marker.is_file() and marker.read_text().strip() == sha:
        return next(p for p in src_root.iterdir() if p.is_dir())
    tmp = Path(tempfile.mkdtemp(prefix=".src.", dir=build_dir))
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - Pythons before 3.10.12
            tar.extractall(tmp)
    (tmp / ".sdist-sha256").write_text(sha + "\n")
    if src_root.exists():
        shutil.rmtree(src_root)
    os.replace(tmp, src_root)
    return next(p for p in src_root.iterdir() if p.is_dir())


def compiled_objects(src: Path) -> int:
    return sum(1 for _ in src.glob("build/temp.*/**/*.o"))


# --- run --------------------------------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_build(plan: BuildPlan, src: Path, say: Say, base_env: dict[str, str] | None = None) -> Path:
    """Run setup.py bdist_wheel in ``src``; report progress; return the wheel. Log: <src>/samebox-build.log."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(plan.env)
    env["PYTHONUNBUFFERED"] = "1"
    ninja = ninja_path(env, plan.command[0])
    if ninja:
        env["PATH"] = f"{Path(ninja).parent}{os.pathsep}{env.get('PATH', '')}"
    dist = src / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    log_path = src / "samebox-build.log"
    say(f"building {plan.key.id}: MAX_JOBS={plan.jobs} NVCC_THREADS={plan.nvcc_threads}, "
        f"{plan.objects} objects, ETA ~{_fmt(plan.eta_s)}")
    for note in plan.notes:
        say(note)
    start = time.monotonic()
    tail: list[str] = []
    with open(log_path, "w") as log:
        # Own process group: a kill of samebox (timeout, Ctrl-C) stops ninja and nvcc too, leaving ninja's state.
        proc = subprocess.Popen(list(plan.command), cwd=src, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        previous = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                m = _PROGRESS.match(line)
                if m:
                    done, total = int(m.group(1)), int(m.group(2))
                    elapsed = time.monotonic() - start
                    # The first two waves of jobs finish unevenly: until then the plan's ETA counts down, after
                    # that the rate seen so far (it adapts to a slower or faster machine).
                    left = elapsed / done * (total - done) if done >= 2 * plan.jobs else max(plan.eta_s - elapsed, 0)
                    say(f"compiled {done}/{total} objects, {_fmt(elapsed)} elapsed, ~{_fmt(left)} left")
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            say(f"build stopped; {compiled_objects(src)} objects kept in {src} for the next run")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        raise SameboxError(f"flash-attn build failed (exit {rc}) after {_fmt(time.monotonic() - start)}; "
                           f"full log: {log_path}", "run the same command again to resume from what compiled",
                           tail[-15:])
    wheels = sorted(dist.glob("flash_attn-*.whl"))
    if len(wheels) != 1:
        raise SameboxError(f"build finished but {dist} holds {len(wheels)} flash_attn wheels", f"see {log_path}")
    say(f"built {wheels[0].name} in {_fmt(time.monotonic() - start)}")
    return wheels[0]
