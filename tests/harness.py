"""Docker test harness: a reachable daemon (started by .ci/run, or by hand with tests/docker/dockerd.sh), the local
debootstrap base image, buildah with a private store holding that base, and helpers that build the test catalog's
image with the real `samebox image` command.

With CI=true a missing daemon or buildah fails the test instead of skipping it (tests/conftest.py ``require``).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.core.environment import canonical_name
from builder.core.fsutil import sha256_file
from tests.conftest import REPO, require

TEST_ROOT = REPO / "tests" / "fixtures" / "catalog"
# The password of the stand-in private mirror: it must reach pip and appear nowhere else.
CANARY = f"samebox-canary-{uuid.uuid4().hex}"
TEST_IMAGE_ID = "test-bookworm-py311"
BASE_IMAGE = "samebox-test/bookworm-python:latest"
DOCKERD_DIR = os.environ.get("SAMEBOX_DOCKERD_DIR", "/tmp/samebox-dockerd")


def docker_binary() -> str:
    """Debian's classic client builds with BuildKit without the buildx plugin; prefer it when present."""
    return os.environ.get("SAMEBOX_DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")


@dataclass
class Docker:
    binary: str

    def __call__(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, check=check, input=input)

    def run(self, image: str, *cmd: str, network: str = "none", extra: tuple[str, ...] = ()) -> str:
        out = self("run", "--rm", "--network", network, *extra, image, *cmd)
        return out.stdout

    def inspect(self, image: str) -> dict:
        return json.loads(self("image", "inspect", image).stdout)[0]

    def exists(self, image: str) -> bool:
        return self("image", "inspect", image, check=False).returncode == 0


def _reachable(binary: str) -> bool:
    try:
        return subprocess.run([binary, "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker() -> Docker:
    if "DOCKER_HOST" not in os.environ and Path(DOCKERD_DIR, "docker.sock").exists():
        os.environ["DOCKER_HOST"] = f"unix://{DOCKERD_DIR}/docker.sock"
    binary = docker_binary()
    require(_reachable(binary), "no Docker daemon reachable (start one: tests/docker/dockerd.sh start)")
    os.environ["SAMEBOX_DOCKER"] = binary
    return Docker(binary)


@pytest.fixture(scope="session")
def test_base_image(docker: Docker) -> str:
    if not docker.exists(BASE_IMAGE):
        subprocess.run(["bash", str(REPO / "tests/docker/base-image.sh"), BASE_IMAGE], check=True,
                       env={**os.environ, "DOCKER": docker.binary})
    return BASE_IMAGE


@dataclass
class Buildah:
    """buildah with a private store (its own storage.conf) and chroot isolation: ``env`` goes to every call (and
    is in os.environ while the session's tests run, for the engine samebox drives)."""

    binary: str
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, check=check,
                              env={**os.environ, **self.env})


def _store_conf(path: Path, driver: str) -> None:
    path.write_text(f'[storage]\ndriver = "{driver}"\nrunroot = "{path.parent}/run"\n'
                    f'graphroot = "{path.parent}/graph"\n')


@pytest.fixture(scope="session")
def buildah(docker: Docker, test_base_image: str, tmp_path_factory: pytest.TempPathFactory):
    """buildah with the test base image in a private store: overlay where the kernel allows it, else vfs (slower:
    a full copy per layer). The store is removed at the end of the session."""
    binary = shutil.which("buildah")
    require(binary is not None, "buildah not installed (apt-get install buildah)")
    assert binary is not None
    root = tmp_path_factory.mktemp("buildah")
    base = root / "base.tar"
    docker("save", "-o", str(base), test_base_image)
    for driver in ("overlay", "vfs"):
        store = root / driver
        store.mkdir()
        _store_conf(store / "storage.conf", driver)
        engine = Buildah(binary, {"CONTAINERS_STORAGE_CONF": str(store / "storage.conf"),
                                  "BUILDAH_ISOLATION": "chroot"})
        pulled = engine("pull", "--quiet", f"docker-archive:{base}", check=False)
        if pulled.returncode == 0:
            break
    assert pulled.returncode == 0, f"buildah could not load the base image: {pulled.stderr}"
    base.unlink()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in engine.env.items():
            mp.setenv(name, value)
        yield engine
    engine("rmi", "--all", "--force", check=False)
    shutil.rmtree(root, ignore_errors=True)


def samebox(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)


def build_test_image(output: Path, tag: str, env: dict[str, str] | None = None,
                     root: Path = TEST_ROOT, *extra: str) -> subprocess.CompletedProcess:
    return samebox("image", "--root", str(root), "--image", TEST_IMAGE_ID, "--output", str(output), "--tag", tag,
                   *extra, env=env)


class _PrivateIndex(http.server.BaseHTTPRequestHandler):
    """A PEP 503 index that needs a password, like a company mirror: serves the test lock's wheels."""

    wheels: Path
    authorized: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"samebox:{CANARY}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
            self.end_headers()
            return
        self.authorized.append(self.path)
        parts = [p for p in self.path.split("/") if p]
        if parts[:1] == ["simple"] and len(parts) == 2:
            name = parts[1]
            links = "".join(
                f'<a href="/files/{w.name}#sha256={sha256_file(w)}">{w.name}</a>'
                for w in sorted(self.wheels.glob("*.whl"))
                if canonical_name(w.name.split("-")[0]) == name)
            body, ctype = f"<html><body>{links}</body></html>".encode(), "text/html"
        elif parts[:1] == ["files"] and len(parts) == 2 and (self.wheels / parts[1]).is_file():
            body, ctype = (self.wheels / parts[1]).read_bytes(), "application/octet-stream"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def private_index(tmp_path_factory: pytest.TempPathFactory):
    """The test lock's wheels behind a password on 127.0.0.1 (builds use the host network, so they reach it)."""
    wheels = tmp_path_factory.mktemp("index")
    lock = TEST_ROOT / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
    subprocess.run(["bash", str(REPO / "bench" / "wheelhouse.sh"), str(lock), str(wheels), "3.11"], check=True,
                   capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    handler = type("Index", (_PrivateIndex,), {"wheels": wheels, "authorized": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://samebox:{CANARY}@127.0.0.1:{server.server_port}/simple/", handler.authorized
    server.shutdown()
