"""Container engines: build a rendered context with Docker (BuildKit), podman or buildah; `none` only prints.

Secrets (proxy CA bundle, pip index URLs that may carry credentials) go in as BuildKit secrets from files in a
private temp dir outside the context, removed after the build: they never land in a layer or the history.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder import pyindex
from builder.errors import SameboxError

ENGINES = ("docker", "podman", "buildah", "none")
INSTALL_HINT = {
    "docker": "install Docker (Debian/Ubuntu: apt-get install docker.io; or Docker Engine with the buildx plugin)",
    "podman": "install podman (apt-get install podman)",
    "buildah": "install buildah (apt-get install buildah)",
}


@dataclass(frozen=True)
class BuildRequest:
    context: Path
    tag: str
    base_image: str | None = None
    network_host: bool = True
    push: bool = False
    build_args: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False


@dataclass(frozen=True)
class Engine:
    name: str
    binary: str
    mode: str  # "buildx", "buildkit" (DOCKER_BUILDKIT=1 docker build), "podman", "buildah"

    def build_argv(self, req: BuildRequest, secrets: dict[str, Path], env_secrets: dict[str, str] | None = None
                   ) -> list[str]:
        """The build command. ``secrets``: id -> file; ``env_secrets``: id -> the environment variable BuildKit
        reads it from (for a command printed to run elsewhere: no secret written to a file)."""
        if self.mode == "buildx":
            argv = [self.binary, "buildx", "build", "--load", "--progress=plain"]
        elif self.mode == "buildkit":
            argv = [self.binary, "build", "--progress=plain"]
        elif self.mode == "podman":
            argv = [self.binary, "build", "--layers"]
        else:
            argv = [self.binary, "build", "--layers"]
        sources = {**{sid: f"src={path}" for sid, path in secrets.items()},
                   **{sid: f"env={var}" for sid, var in (env_secrets or {}).items()}}
        for sid, source in sorted(sources.items()):
            argv += ["--secret", f"id={sid},{source}"]
        args = {**req.build_args, **({"BASE_IMAGE": req.base_image} if req.base_image else {})}
        for name, value in sorted(args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        if req.network_host:
            argv += ["--network", "host"]
        if req.no_cache:
            argv.append("--no-cache")
        argv += ["-t", req.tag, "-f", str(req.context / "Dockerfile"), str(req.context)]
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.mode == "buildkit":
            env["DOCKER_BUILDKIT"] = "1"
        return env


def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker_candidates() -> list[str]:
    found: list[str] = []
    if os.environ.get("SAMEBOX_DOCKER"):
        found.append(os.environ["SAMEBOX_DOCKER"])
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "docker")
        if os.access(p, os.X_OK) and p not in found:
            found.append(p)
    return found


def _client_major(binary: str) -> int:
    out = subprocess.run([binary, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip().split(".")[0])
    except ValueError:
        return 0


def detect_engine(name: str) -> Engine:
    """Find a usable engine of that name, or say what to install (or to use --engine none)."""
    if name not in ENGINES:
        raise SameboxError(f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINES)}")
    if name == "none":
        return Engine("none", "", "none")
    if name == "docker":
        tried = []
        for binary in _docker_candidates():
            if _ok([binary, "buildx", "version"]):
                return Engine("docker", binary, "buildx")
            # Clients before 23 run BuildKit builds themselves; newer ones need the buildx plugin.
            if 0 < _client_major(binary) < 23:
                return Engine("docker", binary, "buildkit")
            tried.append(binary)
        detail = f" (found {', '.join(tried)} without the buildx plugin)" if tried else ""
        raise SameboxError(
            f"no usable docker client{detail}",
            INSTALL_HINT["docker"] + "; or pick --engine podman|buildah, or --engine none to write the context only",
        )
    binary = shutil.which(name)
    if not binary:
        raise SameboxError(f"{name} not found on PATH", INSTALL_HINT[name] + ", or use --engine none")
    return Engine(name, binary, name)


def ca_bundle_path(explicit: str | None = None) -> Path | None:
    """The proxy CA bundle to hand to the build as a secret: --ca-bundle, else what `samebox lock` uses too."""
    if explicit:
        if not Path(explicit).is_file():
            raise SameboxError(f"CA bundle not found: {explicit}", "pass an existing PEM file to --ca-bundle")
        return Path(explicit)
    found = pyindex.ca_bundle()
    return Path(found) if found else None


@contextmanager
def secret_files(ca_bundle: Path | None) -> Iterator[dict[str, Path]]:
    """Materialise build secrets as 0600 files in a private temp dir that is removed afterwards."""
    values = {
        "pip_index_url": os.environ.get("PIP_INDEX_URL", ""),
        "pip_extra_index_url": os.environ.get("PIP_EXTRA_INDEX_URL", ""),
    }
    with tempfile.TemporaryDirectory(prefix="samebox-secrets-") as d:
        out: dict[str, Path] = {}
        if ca_bundle:
            out["ca_bundle"] = ca_bundle
        for sid, value in values.items():
            if value:
                p = Path(d) / sid
                p.touch(mode=0o600)
                p.write_text(value)
                out[sid] = p
        yield out


def run_build(engine: Engine, req: BuildRequest, log_path: Path, ca_bundle: Path | None = None) -> int:
    """Run the build, streaming its output to the terminal and to log_path. Returns the engine's exit code.

    The engine tags only a finished image, so a failed build leaves no tag pointing at a half-built one.
    """
    with secret_files(ca_bundle) as secrets:
        argv = engine.build_argv(req, secrets)
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, env=engine.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
                log.write(line)
            rc = proc.wait()
    if rc == 0 and req.push:
        rc = subprocess.run([engine.binary, "push", req.tag], env=engine.env()).returncode
    return rc


# Secrets a build reads from the environment of the shell that runs it: id -> variable.
ENV_SECRETS = {"pip_index_url": "PIP_INDEX_URL", "pip_extra_index_url": "PIP_EXTRA_INDEX_URL"}


def printed_command(req: BuildRequest, ca_bundle: Path | None = None) -> str:
    """What `--engine none` prints: a Docker command that builds the written context as it stands, run from this
    directory. The CA bundle (ca_bundle_path's answer) goes in by its absolute path; pip index URLs, which may carry
    credentials, are read by BuildKit from the same variables in the shell that runs it (never printed)."""
    engine = Engine("docker", "docker", "buildkit")
    files = {"ca_bundle": ca_bundle.resolve()} if ca_bundle else {}
    from_env = {sid: var for sid, var in ENV_SECRETS.items() if os.environ.get(var)}
    argv = engine.build_argv(replace(req, context=req.context.resolve()), files, from_env)
    return "DOCKER_BUILDKIT=1 " + shlex.join(argv)
