"""Integration: build the test catalog's image with a real Docker daemon and check it from the inside and out."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from builder.core.fsutil import sha256_file
from tests.harness import (  # noqa: F401
    CANARY,
    TEST_IMAGE_ID,
    TEST_ROOT,
    Docker,
    build_test_image,
    docker,
    private_index,
    test_base_image,
)

pytestmark = pytest.mark.docker
CASES = Path(__file__).parent / "cases"


@pytest.fixture(scope="module")
def built(docker: Docker, test_base_image: str, private_index, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
          ) -> dict:
    """One uncached build of the test image from a password-protected mirror given as PIP_INDEX_URL: the password
    must reach pip and nothing else."""
    url, authorized = private_index
    out = tmp_path_factory.mktemp("ctx")
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    proc = build_test_image(out / TEST_IMAGE_ID, tag, {"PIP_INDEX_URL": url}, TEST_ROOT, "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield {"tag": tag, "context": out / TEST_IMAGE_ID, "log": out / f"{TEST_IMAGE_ID}.build.log",
           "stdout": proc.stdout, "stderr": proc.stderr, "authorized": list(authorized)}
    docker("rmi", "-f", tag, check=False)


def test_labels_name_the_image_and_lockfile(docker: Docker, built: dict) -> None:  # noqa: F811
    labels = docker.inspect(built["tag"])["Config"]["Labels"]
    lock = TEST_ROOT / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
    assert labels["io.samebox.image-id"] == TEST_IMAGE_ID
    assert labels["io.samebox.lock-sha256"] == sha256_file(lock)
    assert labels["org.opencontainers.image.title"] == f"samebox {TEST_IMAGE_ID}"
    assert labels["io.samebox.flash-attn"] == "none: this image has no torch"
    # Debian's Docker 20.10 client builds with the daemon's embedded BuildKit, which cannot stamp the build date on
    # the layers' files: the image and the build output say so.
    assert labels["io.samebox.reproducible"].startswith("no: a Docker client before 23"), labels
    assert "samebox: warning: not reproducible:" in built["stderr"]


def test_every_locked_package_installed_at_its_version(docker: Docker, built: dict) -> None:  # noqa: F811
    out = docker.run(built["tag"], "python3", "/case/verify", extra=("-v", f"{CASES / 'minimal'}:/case:ro"))
    assert "installed at their locked versions" in out


def test_no_build_secret_in_image_or_history(docker: Docker, built: dict, tmp_path: Path) -> None:  # noqa: F811
    history = docker("history", "--no-trunc", built["tag"]).stdout
    assert CANARY not in history
    tar = tmp_path / "image.tar"
    docker("save", "-o", str(tar), built["tag"])
    assert CANARY.encode() not in tar.read_bytes()
    assert CANARY not in docker("image", "inspect", built["tag"]).stdout
    # It went to the build as a BuildKit secret file and pip used it: the mirror saw the password...
    assert "--secret id=pip_index_url,src=" in built["stderr"]
    assert any(p.startswith("/files/") for p in built["authorized"]), built["authorized"]
    # ...and it was never printed, nor kept in the build log.
    assert CANARY not in built["stderr"] + built["stdout"] + built["log"].read_text()


def _copy_checkout(dest: Path) -> Path:
    repo = Path(__file__).resolve().parents[2]
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for item in ("pyproject.toml", "README.md", "builder", "trainer", "images", "configs"):
        src = repo / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        elif src.exists():
            shutil.copyfile(src, dest / item)
    shutil.copytree(TEST_ROOT, dest / "catalog")
    return dest


def _cached_steps(log: str) -> set[str]:
    """BuildKit plain progress: '#8 [deps 2/2] RUN ...' then '#8 CACHED'. Returns the cached step titles."""
    titles = dict(re.findall(r"^(#\d+) (\[.*)$", log, re.M))
    return {titles[n] for n in re.findall(r"^(#\d+) CACHED$", log, re.M) if n in titles}


def test_code_change_rebuild_reuses_dependency_layers(docker: Docker, test_base_image: str,  # noqa: F811
                                                      tmp_path: Path) -> None:
    checkout = _copy_checkout(tmp_path / "checkout")
    env = {"SAMEBOX_ROOT": str(checkout)}
    tags = [f"samebox-test:{uuid.uuid4().hex[:8]}" for _ in range(2)]
    root = checkout / "catalog"
    first = build_test_image(tmp_path / "a" / TEST_IMAGE_ID, tags[0], env=env, root=root)
    assert first.returncode == 0, first.stderr
    with open(checkout / "trainer" / "__init__.py", "a") as fh:
        fh.write(f"\n# a code change {uuid.uuid4().hex}\n")  # unique: no earlier build's cache can hold it
    second = build_test_image(tmp_path / "b" / TEST_IMAGE_ID, tags[1], env=env, root=root)
    assert second.returncode == 0, second.stderr
    try:
        # BuildKit's own account of the second build: interpreter and locked dependencies reused, samebox rebuilt.
        cached = _cached_steps((tmp_path / "b" / f"{TEST_IMAGE_ID}.build.log").read_text())
        assert any("-m venv" in step for step in cached), cached
        assert any("--require-hashes" in step for step in cached), cached
        assert not any("/opt/samebox/src && samebox --version" in step for step in cached), cached
        layers = [docker.inspect(t)["RootFS"]["Layers"] for t in tags]
        assert layers[0] != layers[1], "the code change must reach the image"
    finally:
        docker("rmi", "-f", *tags, check=False)


def test_failed_build_keeps_log_and_creates_no_tag(docker: Docker, test_base_image: str,  # noqa: F811
                                                   tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    shutil.copytree(TEST_ROOT, root)
    lock = root / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
    text = lock.read_text()
    tampered = re.sub(r"--hash=sha256:[0-9a-f]{64}", "--hash=sha256:" + "0" * 64, text)
    lock.write_text(tampered)
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    # A tampered lock is stale by its recorded hash: --allow-stale lets it reach pip, whose hash check must stop it.
    proc = build_test_image(tmp_path / "out" / TEST_IMAGE_ID, tag, None, root, "--allow-stale")
    assert proc.returncode == 1
    assert "no tag was created" in proc.stderr
    log = tmp_path / "out" / f"{TEST_IMAGE_ID}.build.log"
    assert log.is_file() and "hash" in log.read_text().lower()
    assert not docker.exists(tag)


def test_engine_none_prints_a_command_that_builds_as_printed(docker: Docker, test_base_image: str,  # noqa: F811
                                                             private_index, tmp_path: Path) -> None:  # noqa: F811
    """`--engine none` with a CA bundle and a password-protected PIP_INDEX_URL: the printed command, run by a shell
    elsewhere with the same variable set, builds the image; the password was never printed."""
    import os
    import subprocess

    from tests.harness import samebox

    url, authorized = private_index
    ca = tmp_path / "proxy-ca.pem"
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", ca)
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    proc = samebox("image", "--root", str(TEST_ROOT), "--image", TEST_IMAGE_ID, "--engine", "none", "--output",
                   str(tmp_path / "ctx"), "--tag", tag, "--ca-bundle", str(ca), "--no-cache",
                   env={"PIP_INDEX_URL": url})
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1].strip()
    assert CANARY not in proc.stdout + proc.stderr and "CA.pem" not in command
    seen = len(authorized)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PIP_INDEX_URL": url, "PATH": f"{Path(docker.binary).parent}:{os.environ['PATH']}"}
    try:
        run = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True,
                             timeout=1200)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert docker.exists(tag)
        assert any(p.startswith("/files/") for p in authorized[seen:]), "pip reached the mirror through the secret"
    finally:
        docker("rmi", "-f", tag, check=False)


def test_verify_built_image_against_its_lock(docker: Docker, built: dict, tmp_path: Path) -> None:  # noqa: F811
    """`samebox verify --built-image REF`: the labels name the entry and lock; samebox inside checks what is
    installed. A file changed after the build and a lock moved since are both reported."""
    from tests.harness import samebox

    ok = samebox("verify", "--root", str(TEST_ROOT), "--built-image", built["tag"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "and what is installed in it matches it" in ok.stdout and "reproducible: no:" in ok.stdout
    tampered = f"{built['tag']}-tampered"
    site = "/opt/samebox/venv/lib/python3.11/site-packages"
    docker("build", "--network", "none", "-t", tampered, "-",
           input=f"FROM {built['tag']}\nRUN echo '# changed' >> {site}/six.py\n")
    root = tmp_path / "catalog"
    shutil.copytree(TEST_ROOT, root)
    lock = root / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
    lock.write_text(lock.read_text().replace("packaging==26.3", "packaging==26.2"))
    try:
        bad = samebox("verify", "--root", str(root), "--built-image", tampered, "--json")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        problems = "\n".join(json.loads(bad.stdout)["problems"])
        assert f"but {lock} now has sha256" in problems
        assert "packaging is 26.3, the lock has 26.2" in problems
        assert "six 1.17.0: 1 file(s) differ from its RECORD (six.py)" in problems
    finally:
        docker("rmi", "-f", tampered, check=False)
