"""Container engines: build a rendered context with Docker (BuildKit), podman or buildah; `none` only prints.

``ENGINES`` is the registry: each engine is one ``EngineKind`` (what to install, the ``Driver``s it builds with, in
order of preference, and the ``ImageCommands`` that inspect, save and remove a local image); ``detect_engine`` finds a
client binary and the first driver it can run. Each driver says how it stamps a fixed build date on every file and
on the image's history (``Stamping``), or why it cannot: then the image is labelled not reproducible.

Secrets (proxy CA bundle, pip index URLs that may carry credentials) go in as BuildKit secrets from files in a
private temp dir outside the context, removed after the build: they never land in a layer or the history.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.core import pyindex, settings
from builder.core.errors import SameboxError


@dataclass(frozen=True)
class BuildRequest:
    context: Path
    tag: str
    base_image: str | None = None
    network_host: bool = True
    push: bool = False
    build_args: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # added to the Dockerfile's own, by the engine


@dataclass(frozen=True)
class Stamping:
    """What a client does with a build date: ``args`` make it stamp the date on every file of every layer and on the
    image's history, so that the same context gives the same image; ``missing`` says why it cannot (args empty)."""

    args: tuple[str, ...] = ()
    missing: str = ""


def _cannot_stamp(binary: str, epoch: int) -> Stamping:
    return Stamping(missing="this client does not say how it stamps a build date")


def _always(binary: str) -> bool:
    return True


@dataclass(frozen=True)
class Driver:
    """One way a client runs a build: the arguments after the binary that start it, the environment it needs, and
    whether a given client binary can do it."""

    build: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    usable: Callable[[str], bool] = _always
    stamp: Callable[[str, int], Stamping] = _cannot_stamp
    unstamped: tuple[str, ...] = ()  # what the build needs instead of the stamping args when there are none


@dataclass(frozen=True)
class Engine:
    """A client found on this machine: its registry name, its binary and the driver it builds with."""

    name: str
    binary: str
    driver: Driver | None  # None: write the context only (--engine none)

    def build_argv(self, req: BuildRequest, secrets: dict[str, Path], env_secrets: dict[str, str] | None = None,
                   stamping: Stamping = Stamping()) -> list[str]:
        """The build command. ``secrets``: id -> file; ``env_secrets``: id -> the environment variable BuildKit
        reads it from (for a command printed to run elsewhere: no secret written to a file); ``stamping``: what
        ``stamping()`` answered for the build date."""
        assert self.driver is not None, f"engine {self.name} does not build"
        argv = [self.binary, *self.driver.build, *(stamping.args or self.driver.unstamped)]
        sources = {**{sid: f"src={path}" for sid, path in secrets.items()},
                   **{sid: f"env={var}" for sid, var in (env_secrets or {}).items()}}
        for sid, source in sorted(sources.items()):
            argv += ["--secret", f"id={sid},{source}"]
        args = {**req.build_args, **({"BASE_IMAGE": req.base_image} if req.base_image else {})}
        for name, value in sorted(args.items()):
            argv += ["--build-arg", f"{name}={value}"]
        for name, value in sorted(req.labels.items()):
            argv += ["--label", f"{name}={value}"]
        if req.network_host:
            argv += ["--network", "host"]
        if req.no_cache:
            argv.append("--no-cache")
        argv += ["-t", req.tag, "-f", str(req.context / "Dockerfile"), str(req.context)]
        return argv

    def env(self) -> dict[str, str]:
        return {**os.environ, **dict(self.driver.env if self.driver else ())}

    def stamping(self, epoch: int) -> Stamping:
        assert self.driver is not None, f"engine {self.name} does not build"
        return self.driver.stamp(self.binary, epoch)

    def _commands(self) -> ImageCommands:
        return ENGINES[self.name].images

    def image(self, ref: str) -> ImageInfo | None:
        """What the engine's store says of a local image, or None when it has no such image."""
        commands = self._commands()
        out = subprocess.run([self.binary, *commands.inspect, ref], capture_output=True, text=True, env=self.env())
        if out.returncode != 0:
            return None
        return commands.read(json.loads(out.stdout))

    def save(self, ref: str, archive: Path) -> None:
        """Write the image as a docker-archive tar (manifest.json, the config, one tar per layer)."""
        argv = [self.binary, *(a.format(ref=ref, archive=archive) for a in self._commands().save)]
        out = subprocess.run(argv, capture_output=True, text=True, env=self.env())
        if out.returncode != 0:
            raise SameboxError(f"could not export {ref} with {shlex.join(argv)}: {out.stderr.strip()[-500:]}",
                               f"check that {ref} exists (`{self.name} images`) and that {archive.parent} has room")

    def remove(self, ref: str) -> None:
        subprocess.run([self.binary, *self._commands().remove, ref], capture_output=True, env=self.env())

    def run_in(self, ref: str, argv: list[str], mounts: dict[Path, str]) -> subprocess.CompletedProcess:
        """Run ``argv`` in a throw-away container of the image, without network, with host files mounted read-only
        (host path -> path inside)."""
        return self._commands().run(self, ref, argv, mounts)


@dataclass(frozen=True)
class ImageInfo:
    """A local image as its engine describes it: its id (the digest of its config), its layers' diff ids in order
    and its labels."""

    id: str
    layers: tuple[str, ...]
    labels: dict[str, str]


def _read_docker_inspect(data: list[dict]) -> ImageInfo:
    """`docker image inspect` and `podman image inspect`: a list with one object."""
    image = data[0]
    layers = tuple(image.get("RootFS", {}).get("Layers") or ())
    return ImageInfo(image["Id"], layers, dict((image.get("Config") or {}).get("Labels") or {}))


def _read_buildah_inspect(data: dict) -> ImageInfo:
    oci = data["OCIv1"]
    layers = tuple(oci.get("rootfs", {}).get("diff_ids") or ())
    labels = dict((oci.get("config") or {}).get("Labels") or {})
    image_id = data["FromImageID"]
    return ImageInfo(image_id if ":" in image_id else f"sha256:{image_id}", layers, labels)


def _volumes(mounts: dict[Path, str]) -> list[str]:
    return [arg for src, dst in sorted(mounts.items()) for arg in ("-v", f"{src}:{dst}:ro")]


def _docker_run(engine: Engine, ref: str, argv: list[str], mounts: dict[Path, str]) -> subprocess.CompletedProcess:
    # --entrypoint: a workstation image's entrypoint would start JupyterLab first.
    return subprocess.run([engine.binary, "run", "--rm", "--network", "none", *_volumes(mounts), "--entrypoint",
                           argv[0], ref, *argv[1:]], capture_output=True, text=True, env=engine.env())


def _buildah_run(engine: Engine, ref: str, argv: list[str], mounts: dict[Path, str]) -> subprocess.CompletedProcess:
    """buildah runs commands in a working container: made from the image, removed afterwards."""
    made = subprocess.run([engine.binary, "from", "--quiet", ref], capture_output=True, text=True, env=engine.env())
    if made.returncode != 0:
        return made
    container = made.stdout.strip().splitlines()[-1]
    try:
        return subprocess.run([engine.binary, "run", "--network", "none", *_volumes(mounts), container, "--", *argv],
                              capture_output=True, text=True, env=engine.env())
    finally:
        subprocess.run([engine.binary, "rm", container], capture_output=True, env=engine.env())


@dataclass(frozen=True)
class ImageCommands:
    """How a client answers about a local image: ``inspect`` + ref prints JSON that ``read`` turns into an
    ``ImageInfo``; ``save`` (with {ref} and {archive}) writes it as a docker-archive tar; ``remove`` + ref untags it;
    ``run`` runs a command in a container of it."""

    inspect: tuple[str, ...]
    read: Callable[..., ImageInfo]
    save: tuple[str, ...]
    remove: tuple[str, ...]
    run: Callable[[Engine, str, list[str], dict[Path, str]], subprocess.CompletedProcess] = _docker_run


DOCKER_IMAGES = ImageCommands(("image", "inspect"), _read_docker_inspect, ("save", "-o", "{archive}", "{ref}"),
                              ("rmi",))
BUILDAH_IMAGES = ImageCommands(("inspect", "--type", "image"), _read_buildah_inspect,
                               ("push", "--quiet", "{ref}", "docker-archive:{archive}"), ("rmi",), _buildah_run)


def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _client_major(binary: str) -> int:
    out = subprocess.run([binary, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip().split(".")[0])
    except ValueError:
        return 0


def _buildx_buildkit(binary: str) -> tuple[int, int] | None:
    """The BuildKit version of the current buildx builder (`docker buildx inspect` says it once the builder ran)."""
    try:
        out = subprocess.run([binary, "buildx", "inspect", "--bootstrap"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^\s*buildkit(?: version)?:\s*v?(\d+)\.(\d+)", out.stdout, re.I | re.M)
    return (int(found[1]), int(found[2])) if found else None


# BuildKit stamps SOURCE_DATE_EPOCH (a build arg) on the history and config since 0.11, and on the files of every
# layer only with the exporter's rewrite-timestamp, since 0.13.
REWRITE_TIMESTAMP_BUILDKIT = (0, 13)


def _buildx_stamp(binary: str, epoch: int) -> Stamping:
    version = _buildx_buildkit(binary)
    if version is not None and version >= REWRITE_TIMESTAMP_BUILDKIT:
        return Stamping(("--output", "type=docker,rewrite-timestamp=true"))
    seen = "of an unknown version" if version is None else f"v{version[0]}.{version[1]}"
    return Stamping(missing=f"the buildx builder runs BuildKit {seen}; rewrite-timestamp, which stamps the build date "
                            "on every file of a layer, needs BuildKit 0.13 or newer (Docker Engine 26+)")


def _embedded_buildkit_stamp(binary: str, epoch: int) -> Stamping:
    return Stamping(missing="a Docker client before 23 builds with the daemon's embedded BuildKit, which stamps the "
                            "build time, not SOURCE_DATE_EPOCH, on the files of every layer and on the history")


def _timestamp_stamp(binary: str, epoch: int) -> Stamping:
    return Stamping(("--timestamp", str(epoch)))


BUILDX = Driver(("buildx", "build", "--progress=plain"), usable=lambda b: _ok([b, "buildx", "version"]),
                stamp=_buildx_stamp, unstamped=("--load",))
# Docker clients before 23 run BuildKit builds themselves; newer ones need the buildx plugin.
BUILDKIT = Driver(("build", "--progress=plain"), (("DOCKER_BUILDKIT", "1"),), lambda b: 0 < _client_major(b) < 23,
                  stamp=_embedded_buildkit_stamp)
# podman and buildah: BuildKit's Dockerfile syntax, layers cached; --timestamp sets every file's time and the history's.
# Their layer cache does not key on --timestamp: samebox always passes the same date (reproducible.SOURCE_DATE_EPOCH).
DAEMONLESS = Driver(("build", "--layers"), stamp=_timestamp_stamp)


@dataclass(frozen=True)
class EngineKind:
    """One entry of the registry: ``drivers`` are tried in order on each client binary found ($SAMEBOX_<NAME>
    first, then every ``name`` on PATH); ``unusable`` says why a found client fits none of them."""

    name: str
    install: str
    drivers: tuple[Driver, ...] = ()
    unusable: str = ""
    images: ImageCommands = DOCKER_IMAGES


# The container engines. A new one is one entry here.
ENGINES: dict[str, EngineKind] = {kind.name: kind for kind in (
    EngineKind("docker", "install Docker (Debian/Ubuntu: apt-get install docker.io; or Docker Engine with the buildx "
               "plugin)", (BUILDX, BUILDKIT), "without the buildx plugin"),
    EngineKind("podman", "install podman (apt-get install podman)", (DAEMONLESS,)),
    EngineKind("buildah", "install buildah (apt-get install buildah)", (DAEMONLESS,), images=BUILDAH_IMAGES),
    EngineKind("none", ""),  # writes the context and prints the docker command that builds it
)}


def _candidates(name: str) -> list[str]:
    found: list[str] = []
    override = settings.engine_client(name)
    if override:
        found.append(override)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK) and p not in found:
            found.append(p)
    return found


def detect_engine(name: str) -> Engine:
    """Find a usable client of that registry entry, or say what to install (or to use --engine none)."""
    kind = ENGINES.get(name)
    if kind is None:
        raise SameboxError(f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINES)}")
    if not kind.drivers:
        return Engine(name, "", None)
    tried = _candidates(name)
    for binary in tried:
        for driver in kind.drivers:
            if driver.usable(binary):
                return Engine(name, binary, driver)
    others = "|".join(n for n, k in ENGINES.items() if k.drivers and n != name)
    hint = f"{kind.install}; or pick --engine {others}, or --engine none to write the context only"
    if tried:
        raise SameboxError(f"no usable {name} client (found {', '.join(tried)} {kind.unusable})", hint)
    raise SameboxError(f"{name} not found on PATH", hint)


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


def run_build(engine: Engine, req: BuildRequest, log_path: Path, ca_bundle: Path | None = None,
              stamping: Stamping = Stamping()) -> int:
    """Run the build, streaming its output to the terminal and to log_path. Returns the engine's exit code.

    The engine tags only a finished image, so a failed build leaves no tag pointing at a half-built one.
    """
    with secret_files(ca_bundle) as secrets:
        argv = engine.build_argv(req, secrets, stamping=stamping)
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
    engine = Engine("docker", "docker", BUILDKIT)
    files = {"ca_bundle": ca_bundle.resolve()} if ca_bundle else {}
    from_env = {sid: var for sid, var in ENV_SECRETS.items() if os.environ.get(var)}
    argv = engine.build_argv(replace(req, context=req.context.resolve()), files, from_env)
    return "DOCKER_BUILDKIT=1 " + shlex.join(argv)
