"""Collect and serialise a fingerprint: what is installed in this Python environment and what the machine is.

Two environments are the same when their fingerprints' environment parts are equal (see builder/instance/drift.py). The
JSON is deterministic (sorted keys, sorted lists, no timestamps), so equal environments give byte-equal files.
Secrets never enter it: environment variables come from an allowlist, any name holding TOKEN/KEY/SECRET/PASSWORD/
CREDENTIAL is dropped, and user:password@ is stripped from URLs.

Imports the standard library only (setup.sh runs parts of it before samebox's dependencies are installed).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from builder.core.environment import Environment, TorchBuild, installed_distributions
from builder.core.fsutil import read_remembered, remember
from builder.core.pyindex import redact

SCHEMA = 1
ENV_ALLOWLIST = (
    "AutoDLRegion", "CONDA_DEFAULT_ENV", "CONDA_PREFIX", "CUDA_CACHE_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
    "HF_ENDPOINT",
    "HF_HOME", "HF_HUB_OFFLINE", "HTTPS_PROXY", "HTTP_PROXY", "LD_LIBRARY_PATH", "NO_PROXY", "PIP_CACHE_DIR",
    "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_TRUSTED_HOST", "PYTHONPATH",
    "TORCHINDUCTOR_CACHE_DIR", "TORCH_CUDA_ARCH_LIST", "TORCH_HOME", "TRANSFORMERS_CACHE", "TRITON_CACHE_DIR",
    "UV_EXTRA_INDEX_URL", "UV_INDEX_URL",
    "VIRTUAL_ENV", "http_proxy", "https_proxy", "no_proxy",
)
ENV_PREFIXES = ("SAMEBOX_",)
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
# RECORD rows an installer writes itself: they differ between pip and uv, and between runs.
_INSTALLER_FILES = ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def selected_env(environ: dict[str, str] | os._Environ[str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {
        k: redact(v) for k, v in sorted(environ.items())
        if (k in ENV_ALLOWLIST or k.startswith(ENV_PREFIXES)) and not is_secret_name(k)
    }


# --- distributions ----------------------------------------------------------------------------------------------


def _normal(path: str) -> str:
    """A RECORD path as importlib's PackagePath spells it (PurePosixPath: no '//', './' or trailing '/'), without
    building a path object for the paths that need nothing (nearly all of them)."""
    if "//" in path or "/./" in path or path.startswith("./") or path.endswith(("/", "/.")) or path == ".":
        return str(PurePosixPath(path))
    return path


def _record(dist: md.Distribution) -> list[tuple[str, str]] | None:
    """(path, 'sha256=...') rows of the RECORD, read as text: importlib's ``files`` builds a path object per row,
    and from Python 3.12 leaves out rows whose file is missing (a deleted file must count as modified). None without
    a RECORD (an egg-info's file list stands in, as importlib reads it)."""
    text = dist.read_text("RECORD")
    if not text:
        files = dist.files
        if files is None:
            return None
        return [(str(f), f"{f.hash.mode}={f.hash.value}" if f.hash else "") for f in files]
    rows = []
    for row in csv.reader(text.splitlines()):
        if not row:
            continue
        spec = row[1] if len(row) > 1 else ""
        rows.append((_normal(row[0]), (spec if "=" in spec else f"{spec}=") if spec else ""))
    return rows


def _wheel_rows(dist: md.Distribution, record: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(path, 'sha256=...') RECORD rows of the files the wheel brought: no bytecode, no installer bookkeeping.
    Rows outside site-packages (console scripts, which installers rewrite) keep their path and lose their hash."""
    rows = []
    for path, digest in (_record(dist) if record is None else record) or []:
        path = path.replace("\\", "/")
        if path.endswith(".pyc") or "/__pycache__/" in path:
            continue
        if ".dist-info/" in path and path.rsplit("/", 1)[-1] in _INSTALLER_FILES:
            continue
        rows.append((path, "" if path.startswith("..") else digest))
    return sorted(rows)


def _digest_of(rows: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{p},{d}\n" for p, d in rows).encode()).hexdigest() if rows else ""


def _file_matches(dist: md.Distribution, path: str, digest: str) -> bool:
    mode, _, want = digest.partition("=")
    try:
        h = hashlib.new(mode)
        with open(dist.locate_file(path), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, ValueError):
        return False
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode() == want


def _size(dist: md.Distribution, path: str) -> int:
    try:
        return os.path.getsize(dist.locate_file(path))
    except OSError:
        return 0


def _stat_row(base: str, path: str) -> str:
    try:
        st = os.stat(os.path.join(base, path))
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode}"


# A file modified this close before a check may change again within the same mtime (git's "racy clean").
RACY_NS = 2_000_000_000


def _row_stat(row: str) -> tuple[int, int]:
    """(size, mtime) of a _stat_row ('path:size:mtime:mode'; (0, 0) for a missing file)."""
    parts = row.rsplit(":", 3)
    return (int(parts[1]), int(parts[2])) if len(parts) == 4 and parts[1].isdigit() else (0, 0)


def _dist_key(name: str, dist: md.Distribution) -> str:
    return f"{dist.locate_file('')}|{name}|{dist.version}"


def default_checks_path() -> Path:
    from builder.core import settings

    return settings.file_checks()


def check_files(dists: dict[str, md.Distribution], workers: int | None = None, cache: Path | None = None,
                wheel_rows: dict[str, list[tuple[str, str]]] | None = None, refresh: bool = False
                ) -> dict[str, list[str]]:
    """Canonical name -> RECORD paths whose file is missing or differs from its RECORD hash (hashed in threads;
    hashlib releases the GIL). A distribution without a RECORD is reported as ['RECORD'].

    With ``cache`` (a JSON file), a distribution whose files all have the size, mtime and mode they had when it was
    last hashed, at the same place under the same RECORD, keeps that finding without being read again (rsync's
    quick check; no inode, so clones of one image share the findings); any change to one of its files hashes the
    whole distribution again. ``wheel_rows``: each
    distribution's _wheel_rows when the caller has read them already (a RECORD is read once); ``refresh``: read every
    file and write what was found (`--rehash`). A finding is not kept for a distribution with a file modified in the
    last seconds before the check (it may change again within the same mtime)."""
    workers = workers or min(32, 2 * (os.cpu_count() or 4))
    problems: dict[str, list[str]] = {name: [] for name in dists}
    wheel = wheel_rows or {}
    rows, digests = {}, {}
    for name, dist in dists.items():
        found = wheel.get(name)
        if found is None:
            record = _record(dist)
            if record is None:
                problems[name].append("RECORD")
                continue
            found = _wheel_rows(dist, record)
        digests[name] = _digest_of(found)
        rows[name] = [(p, d) for p, d in found if d]
    checks = {} if refresh or cache is None else read_remembered(cache)
    began_ns = time.time_ns()
    recent: set[str] = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        todo = dict(rows)
        signatures: dict[str, str] = {}
        sized: dict[tuple[str, str], int] = {}  # (name, path) -> size, from the stats the findings needed anyway
        if cache is not None:
            def stats(name: str) -> list[str]:
                base = str(dists[name].locate_file(""))
                return [_stat_row(base, p) for p, _ in rows[name]]

            for name, found in zip(rows, pool.map(stats, rows), strict=True):
                stat = [_row_stat(row) for row in found]
                sized.update(((name, p), size) for (p, _), (size, _) in zip(rows[name], stat, strict=True))
                signatures[name] = hashlib.sha256((digests[name] + "\n" + "\n".join(found)).encode()).hexdigest()
                if any(mtime >= began_ns - RACY_NS for _, mtime in stat):
                    recent.add(name)
                known = checks.get(_dist_key(name, dists[name]))
                if isinstance(known, dict) and known.get("signature") == signatures[name] \
                        and isinstance(known.get("modified"), list):
                    problems[name] = list(known["modified"])
                    del todo[name]
        jobs = [(name, dists[name], p, d) for name in todo for p, d in todo[name]]
        # the largest files first: a 1 GB library started last would hash alone while the other threads idle
        sizes = [sized[(j[0], j[2])] for j in jobs] if sized else list(pool.map(lambda j: _size(j[1], j[2]), jobs))
        jobs = [job for _, job in sorted(zip(sizes, jobs, strict=True), key=lambda pair: -pair[0])]
        results = pool.map(lambda j: _file_matches(j[1], j[2], j[3]), jobs)
        for (name, _, path, _), ok in zip(jobs, results, strict=True):
            if not ok:
                problems[name].append(path)
    if cache is not None and todo:
        if refresh:
            checks = read_remembered(cache)
        for name in set(todo) - recent:
            checks[_dist_key(name, dists[name])] = {"signature": signatures[name], "modified": sorted(problems[name])}
        remember(cache, checks)  # best effort: only into a directory that exists
    return {name: sorted(paths) for name, paths in problems.items()}


def record_digest(dist: md.Distribution) -> str:
    return _digest_of(_wheel_rows(dist))


def packages(with_files: bool = True, cache: Path | None = None, refresh: bool = False) -> dict[str, dict[str, Any]]:
    dists = installed_distributions()
    records = {name: _record(dist) for name, dist in dists.items()}
    wheel = {name: _wheel_rows(dists[name], rec) for name, rec in records.items() if rec is not None}
    modified = check_files(dists, cache=cache, wheel_rows=wheel, refresh=refresh) if with_files else {}
    out = {}
    for name, dist in sorted(dists.items()):
        entry: dict[str, Any] = {"version": dist.version, "record": _digest_of(wheel.get(name, []))}
        if with_files:
            entry["modified"] = modified[name]
        out[name] = entry
    return out


# --- python, os, torch, cuda, machine ---------------------------------------------------------------------------


def python_facts() -> dict[str, Any]:
    return {
        "build": list(platform.python_build()),
        "compiler": platform.python_compiler(),
        "executable": sys.executable,
        "implementation": platform.python_implementation(),
        "prefix": sys.prefix,
        "version": platform.python_version(),
    }


def os_facts() -> dict[str, str]:
    release: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("ID", "VERSION_ID", "PRETTY_NAME"):
                release[key.lower()] = value.strip().strip('"')
    except OSError:
        pass
    libc, version = platform.libc_ver()
    return {**release, "glibc": f"{libc} {version}".strip(), "machine": platform.machine(), "system": platform.system()}


def torch_facts(build: TorchBuild | None) -> dict[str, Any] | None:
    """torch as it reported itself to the Environment probe, or None when it is not installed."""
    if build is None:
        return None
    if build.error:
        return {"error": build.error}
    return {"arch_list": list(build.arch_list), "cuda": build.cuda, "cudnn": build.cudnn, "cxx11abi": build.cxx11abi,
            "version": build.version}


def nvcc_version() -> str | None:
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in filter(None, candidates):
        if not Path(nvcc).is_file():
            continue
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found = re.search(r"release ([\d.]+), V([\d.]+)", out)
        if found:
            return found.group(2)
    return None


def machine_facts(env: Environment) -> dict[str, Any]:
    """Driver and GPUs as the Environment probe found them; empty on a machine without either."""
    return {"driver": env.driver or None,
            "gpus": [{"compute_capability": str(g.capability) if g.capability else None, "memory_mib": g.memory_mib,
                      "name": g.name} for g in env.gpus]}


def pip_config_sources(environ: dict[str, str] | os._Environ[str] | None = None) -> list[dict[str, Any]]:
    """pip configuration files that exist, in pip's order, with their settings (URLs without credentials)."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get("HOME", "~")).expanduser()
    xdg = environ.get("XDG_CONFIG_HOME", str(home / ".config"))
    paths = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", str(Path(xdg) / "pip" / "pip.conf"),
             str(home / ".pip" / "pip.conf"), str(Path(sys.prefix) / "pip.conf")]
    if environ.get("PIP_CONFIG_FILE"):
        paths.append(environ["PIP_CONFIG_FILE"])
    sources = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        settings = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            key = key.strip()
            if sep and not key.startswith(("#", ";")) and not is_secret_name(key):
                settings[key] = redact(value.strip())
        sources.append({"path": path, "settings": dict(sorted(settings.items()))})
    return sources


def collect(env: Environment | None = None, with_files: bool = True, cache: Path | None = None,
            refresh: bool = False) -> dict[str, Any]:
    """The fingerprint of the running interpreter's environment and of this machine (``env``: its probe;
    ``cache``: check_files' record of unchanged distributions)."""
    env = env or Environment.probe()
    return {
        "env": selected_env(),
        "machine": machine_facts(env),
        "nvcc": nvcc_version(),
        "os": os_facts(),
        "packages": packages(with_files, cache, refresh),
        "pip_config": pip_config_sources(),
        "python": python_facts(),
        "schema": SCHEMA,
        "torch": torch_facts(env.torch),
    }


def dumps(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"


# What `samebox diff` reads from a fingerprint: these sections, and every package's version and RECORD digest.
SECTIONS = ("env", "machine", "nvcc", "os", "packages", "pip_config", "python", "torch")


def shape_problems(data: Any) -> list[str]:
    """Where a parsed JSON document differs from what collect() writes, one line each (empty: a fingerprint)."""
    if not isinstance(data, dict):
        return [f"the document is a JSON {type(data).__name__}, not an object"]
    if data.get("schema") != SCHEMA:
        return [f"schema is {data.get('schema')!r}, not {SCHEMA}"]
    problems = [f"no {key!r} section" for key in SECTIONS if key not in data]
    packages = data.get("packages")
    if "packages" in data and not isinstance(packages, dict):
        return problems + [f"packages is a JSON {type(packages).__name__}, not an object of name -> entry"]
    for name, entry in sorted((packages or {}).items()):
        if not (isinstance(entry, dict) and isinstance(entry.get("version"), str)
                and isinstance(entry.get("record"), str) and isinstance(entry.get("modified", []), list)):
            problems.append(f"packages.{name} lacks a string version and record")
    return problems


def load(path: Path) -> dict[str, Any]:
    from builder.core.errors import SameboxError
    from builder.core.fsutil import read_text

    make = "make one with `samebox fingerprint -o FILE`"
    try:
        data = json.loads(read_text(Path(path), "fingerprint", make))
    except json.JSONDecodeError as e:
        raise SameboxError(f"cannot read fingerprint {path}: not JSON ({e})", make) from None
    problems = shape_problems(data)
    if problems:
        shown = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise SameboxError(f"{path} is not a samebox fingerprint (schema {SCHEMA}):", make, shown)
    return data
