"""setup.sh for real: bash in a container started from the test base image, with no network and a wheelhouse.

One container serves every test (state is reset between runs): the folder cases in tests/setup/cases/, parity with
the image built from the Dockerfile, idempotence, kill -9 at random points, and injected drift.
"""

from __future__ import annotations

import json
import random
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.instance import drift
from tests.conftest import REPO
from tests.harness import CANARY, TEST_IMAGE_ID, TEST_ROOT, Docker, build_test_image, samebox

pytestmark = pytest.mark.docker

CASES = REPO / "tests" / "setup" / "cases"
LOCK = TEST_ROOT / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
SETUP = "bash /src/setup.sh --root /src/tests/fixtures/catalog --offline --wheelhouse /wheels"
VENV_PY = "/opt/samebox/venv/bin/python"
RESET = "rm -rf /opt/samebox /root/.samebox /root/.cache /root/.bashrc /tmp/tampered /tmp/t /tmp/platform-torch " \
        "/tmp/uvbin"
KILL_TRIALS = 10


@dataclass
class Box:
    """A long-running container from the test base image: /src is the checkout, /wheels the wheelhouse."""

    docker: Docker
    cid: str

    def sh(self, script: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        flags = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        return subprocess.run([self.docker.binary, "exec", *flags, self.cid, "bash", "-c", script],
                              capture_output=True, text=True, timeout=timeout)

    def setup(self, args: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.sh(f"{SETUP} {args}", env)

    def fingerprint(self) -> dict[str, Any]:
        # builder.instance.fingerprint needs the standard library only: it works while a locked package is missing.
        code = "import sys; from builder.instance import fingerprint as f; sys.stdout.write(f.dumps(f.collect()))"
        run = self.sh(f"{VENV_PY} -c '{code}'")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)


def _ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test lock's wheels (bench/wheelhouse.sh, the script the GPU run uses too) and, in extra/, wheels that
    are not locked: another six and idna, for injecting drift."""
    dest = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(["bash", str(REPO / "bench" / "wheelhouse.sh"), str(LOCK), str(dest), "3.11"], check=True,
                   capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "six==1.16.0", "idna==3.7", "-d", str(dest / "extra")], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def box(docker: Docker, test_base_image: str, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Box]:
    empty = tmp_path_factory.mktemp("read-only")
    name = f"samebox-setup-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--network", "none", "-v", f"{REPO}:/src:ro", "-v", f"{wheelhouse}:/wheels:ro",
           "-v", f"{empty}:/ro:ro", "--tmpfs", "/small:size=1m", test_base_image, "sleep", "infinity")
    try:
        yield Box(docker, name)
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def converged(box: Box) -> dict[str, Any]:
    """A fresh run to completion: its fingerprint (the reference) and how long it took."""
    _ok(box.sh(RESET))
    start = time.monotonic()
    out = _ok(box.setup())
    return {"fingerprint": box.fingerprint(), "seconds": time.monotonic() - start, "output": out}


def _no_drift(a: dict[str, Any], b: dict[str, Any]) -> None:
    report = drift.diff_fingerprints(a, b)
    assert not report["drift"], drift.format_diff(report)


# --- folder cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_case(box: Box, case: str) -> None:
    folder = CASES / case
    _ok(box.sh(RESET))
    if (folder / "prepare").is_file():
        _ok(box.sh(f"bash /src/tests/setup/cases/{case}/prepare"))
    env = dict(line.split("=", 1) for line in (folder / "env").read_text().split()) if (folder / "env").is_file() \
        else {}
    extra = (folder / "args").read_text().strip()
    run = box.sh(f"bash /src/setup.sh --root /src/tests/fixtures/catalog {extra}", env)
    status, *expected = (folder / "expect").read_text().splitlines()
    output = run.stdout + run.stderr
    assert run.returncode == int(status), output[-4000:]
    for text in expected:
        assert text in output, f"{text!r} not in the output:\n{output[-4000:]}"
    if (folder / "verify").is_file():
        _ok(box.sh(f"bash /src/tests/setup/cases/{case}/verify"))


def test_standalone_script_keeps_its_lock_and_quotes_env(box: Box, tmp_path: Path) -> None:
    """A standalone script (its lock embedded) records that lock for verify and the self-test, and writes env.sh so
    that a cache path full of shell syntax stays a path."""
    script = tmp_path / "standalone.sh"
    made = samebox("setup-script", "--image", TEST_IMAGE_ID, "--root", str(TEST_ROOT), "-o", str(script))
    assert made.returncode == 0, made.stderr
    box.docker("cp", str(script), f"{box.cid}:/tmp/standalone.sh")
    _ok(box.sh(RESET + " /tmp/odd* /tmp/pwned"))
    odd = "/tmp/odd \"dir\" $(touch /tmp/pwned)"
    _ok(box.sh(f"bash /tmp/standalone.sh --samebox-src /src --offline --wheelhouse /wheels --min-free-mb 1 "
               f"--cache-dir {shlex.quote(odd)}"))
    check = (". /root/.samebox/env.sh && test -s \"$SAMEBOX_LOCKFILE\" && printf '%s\\n' \"$HF_HOME\" "
             "&& cd / && /opt/samebox/venv/bin/samebox verify && test ! -e /tmp/pwned")
    out = _ok(box.sh(check))
    assert out.splitlines()[0] == odd + "/huggingface"
    assert "the environment matches /root/.samebox/lock.txt" in out


def test_setup_installs_through_a_password_protected_mirror(docker: Docker, test_base_image: str,
                                                          private_index: tuple[str, list[str]]) -> None:
    """Online, through PIP_INDEX_URL with a password (a company or Tsinghua-style mirror): pip uses it, and the
    password shows up nowhere: not in the output, env.sh or the fingerprint."""
    url, authorized = private_index
    before = len(authorized)
    script = ("bash /src/setup.sh --root /src/tests/fixtures/catalog --no-selftest "
              "&& cat /root/.samebox/env.sh /root/.samebox/fingerprint.json")
    run = docker("run", "--rm", "--network", "host", "-e", f"PIP_INDEX_URL={url}", "-v", f"{REPO}:/src:ro",
                 test_base_image, "bash", "-c", script, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert any(p.startswith("/files/") for p in authorized[before:]), "the locked wheels came from the mirror"
    assert CANARY not in out
    assert "samebox setup: done" in out


# --- parity, idempotence, kill -9, drift --------------------------------------------------------------------------


def test_image_and_setup_script_give_the_same_environment(docker: Docker, converged: dict[str, Any],
                                                          tmp_path: Path) -> None:
    tag = f"samebox-test/setup-parity:{uuid.uuid4().hex[:8]}"
    built = build_test_image(tmp_path / "context", tag)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        image_fp = json.loads(docker.run(tag, "samebox", "fingerprint", "--json"))
    finally:
        docker("rmi", "-f", tag, check=False)
    _no_drift(image_fp, converged["fingerprint"])
    assert image_fp["packages"] == converged["fingerprint"]["packages"]


def test_second_run_changes_nothing_in_seconds(box: Box, converged: dict[str, Any]) -> None:
    before = _ok(box.sh("sha256sum /root/.samebox/fingerprint.json /root/.samebox/env.sh /root/.bashrc"))
    start = time.monotonic()
    out = _ok(box.setup())
    seconds = time.monotonic() - start
    assert "every locked package is installed and intact" in out
    assert "samebox is installed from this source" in out
    assert "Installing" not in out and "creating the virtualenv" not in out
    assert _ok(box.sh("sha256sum /root/.samebox/fingerprint.json /root/.samebox/env.sh /root/.bashrc")) == before
    assert seconds < 15, f"second run took {seconds:.1f}s"


def test_kill_9_at_random_points_converges(box: Box, converged: dict[str, Any]) -> None:
    seed = 20240611
    rng = random.Random(seed)
    full = converged["seconds"]
    stopped_in = []
    for i in range(KILL_TRIALS):
        delay = full * (i + rng.random()) / KILL_TRIALS  # one random point in each tenth of a fresh run
        _ok(box.sh(RESET))
        _ok(box.sh(f"setsid {SETUP} > /tmp/killed.log 2>&1 & pid=$!; sleep {delay:.2f}; "
                   "kill -9 -- -$pid 2>/dev/null; sleep 0.5; true"))
        stopped_in.append(box.sh("cut -d' ' -f2- /root/.samebox/running 2>/dev/null || echo finished").stdout.strip())
        rerun = box.setup()
        assert rerun.returncode == 0, f"trial {i} (seed {seed}, kill after {delay:.2f}s in " \
                                      f"{stopped_in[-1]}):\n{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
        _no_drift(converged["fingerprint"], box.fingerprint())
    assert len(set(stopped_in)) >= 3, f"kills landed in too few steps: {stopped_in}"


def test_injected_drift_is_detected_then_repaired(box: Box, converged: dict[str, Any], tmp_path: Path) -> None:
    reference = converged["fingerprint"]
    locked = {p.name: p.version for p in drift.read_pins(LOCK)}
    pip = f"{VENV_PY} -m pip -q --disable-pip-version-check"
    site = _ok(box.sh(f"{VENV_PY} -c 'import jinja2, os; print(os.path.dirname(jinja2.__file__))'")).strip()
    _ok(box.sh(f"{pip} install --no-index --no-deps /wheels/extra/six-1.16.0-*.whl /wheels/extra/idna-*.whl"
               f" && echo '# edited' >> {shlex.quote(site)}/__init__.py"))
    verify = box.sh(f"{VENV_PY} -m builder verify --image {TEST_IMAGE_ID} --root /src/tests/fixtures/catalog")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"six is 1.16.0, the lock has {locked['six']}" in verify.stdout
    assert "jinja2/__init__.py" in verify.stdout
    _ok(box.sh(f"{pip} uninstall -y packaging"))  # last: samebox's CLI needs packaging
    drifted = box.fingerprint()
    report = drift.diff_fingerprints(reference, drifted)
    groups = {g: [i["what"] for i in items] for g, items in report["groups"].items() if items and g != "settings"}
    assert groups == {"packages added": ["idna"], "packages removed": ["packaging"],
                      "packages changed": ["six"], "files changed": ["jinja2"]}, drift.format_diff(report)

    a, b = tmp_path / "a.json", tmp_path / "b.json"  # a different torch local tag, through the real `samebox diff`
    local = {"version": "2.3.0+cu121", "cuda": "12.1", "cudnn": 8902, "cxx11abi": False, "arch_list": ["sm_80"]}
    a.write_text(json.dumps({**reference, "torch": local}))
    b.write_text(json.dumps({**reference, "torch": {**local, "version": "2.3.0+cu118"}}))
    diff = subprocess.run([sys.executable, "-m", "builder", "diff", str(a), str(b)], capture_output=True, text=True,
                          cwd=REPO)
    assert diff.returncode == 1 and "torch.version: 2.3.0+cu121 -> 2.3.0+cu118" in diff.stdout

    repaired = _ok(box.setup())
    for line in (f"packaging {locked['packaging']} is locked but not installed",
                 f"six is 1.16.0, the lock has {locked['six']}", "jinja2 "):
        assert line in repaired, repaired
    _ok(box.sh(f"{pip} uninstall -y idna"))
    _no_drift(reference, box.fingerprint())
