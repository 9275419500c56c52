"""samebox's own environment: the dev lock `make test` installs, and the ranges the trainer, export and serve check.

lockfiles/dev.txt and dev-builder.txt are written by `make lock-dev` (builder/image/devlock.py, uv); the venv `make
test` builds must be exactly dev.txt; builder/data/supported.toml must be what the committed locks say.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from builder.core import supported
from builder.core.errors import SameboxError
from builder.core.lockfile import read_lock
from builder.image import devlock
from tests.conftest import REPO, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _dist_name(dist: importlib.metadata.Distribution) -> str:
    return dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")


def test_the_venv_is_the_dev_lock_exactly() -> None:
    """Every distribution in the test venv is pinned by lockfiles/dev.txt at that version, and every pin is
    installed; the only others are pip (the venv's own) and samebox itself."""
    in_repo_venv = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
    require(in_repo_venv, f"the tests run in {sys.prefix}, not the venv `make test` builds ({REPO / '.venv'})")
    locked = {name.lower(): version for name, version in read_lock(REPO / devlock.DEV_LOCK).items()}
    installed = {_dist_name(d): d.version for d in importlib.metadata.distributions()}
    extra = {n: v for n, v in installed.items() if n not in locked and n not in ("pip", "samebox")}
    missing = {n: v for n, v in locked.items() if n not in installed}
    wrong = {n: (installed[n], v) for n, v in locked.items() if n in installed and installed[n] != v}
    assert (extra, missing, wrong) == ({}, {}, {}), "run `make test` (it rebuilds the venv from the lock)"


def test_both_dev_locks_are_fresh_and_name_their_inputs() -> None:
    statuses = devlock.check_dev_lock()
    assert [(s.path.name, s.state) for s in statuses] == [("dev.txt", "fresh"), ("dev-builder.txt", "fresh")], \
        [s.reason for s in statuses]
    inputs = devlock.read_inputs()
    dev = read_lock(REPO / devlock.DEV_LOCK)
    assert dev["torch"] == inputs.torch and inputs.torch.endswith("+cpu")
    builder = read_lock(REPO / devlock.BUILDER_LOCK)
    # the builder lock is the dev lock's subset: `make image` and `make test` never disagree on a version
    assert {n: v for n, v in builder.items() if n in dev} == {n: dev[n] for n in builder if n in dev}
    assert {"jinja2", "packaging", "uv", "setuptools"} <= set(builder) and "torch" not in builder
    for rel in (devlock.DEV_LOCK, devlock.BUILDER_LOCK):
        text = (REPO / rel).read_text()
        assert "Regenerate with: make lock-dev" in text and "--hash=sha256:" in text


def test_a_changed_extra_makes_the_dev_lock_stale(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "lockfiles").mkdir(parents=True)
    for rel in ("pyproject.toml", devlock.DEV_LOCK, devlock.BUILDER_LOCK):
        shutil.copyfile(REPO / rel, root / rel)
    assert {s.state for s in devlock.check_dev_lock(root)} == {"fresh"}
    py = root / "pyproject.toml"
    py.write_text(py.read_text().replace('"pyyaml",', '"pyyaml", "rich",'))
    statuses = devlock.check_dev_lock(root)
    assert {s.state for s in statuses} == {"stale"} and "changed" in statuses[0].reason
    proc = subprocess.run([sys.executable, "-m", "builder", "lock", "--dev", "--check", "--root", str(root)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "regenerate with `make lock-dev`" in proc.stderr
    assert "stale" in proc.stdout


def test_lock_dev_check_from_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "builder", "lock", "--dev", "--check", "--json"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert '"state": "fresh"' in proc.stdout


def test_the_supported_table_is_what_the_locks_say() -> None:
    derived = supported.derive(REPO)
    assert supported.load() == derived, "regenerate builder/data/supported.toml with `make lock-dev`"
    assert supported.TABLE.read_text() == supported.render(derived)
    dev = read_lock(REPO / devlock.DEV_LOCK)
    for name in supported.PACKAGES:
        # the dev lock (the newest releases of the day it was refreshed) is the top of every range
        assert derived[name].newest == dev[name], name
    # the installed package carries the table (images and instances have no lockfiles/)
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "data/*.toml" in data["tool"]["setuptools"]["package-data"]["builder"]
    # pyproject's floors are the oldest ends: pip never installs what `samebox train` then refuses
    train = {r.split(">=")[0]: r.split(">=")[1] for r in data["project"]["optional-dependencies"]["train"]
             if ">=" in r}
    for name in ("transformers", "peft", "accelerate"):
        assert train[name].split(".")[:2] == derived[name].oldest.split(".")[:2], name


def test_outside_the_range_is_an_error_below_and_a_warning_above() -> None:
    ranges = supported.load()
    oldest, newest = ranges["transformers"].oldest, ranges["transformers"].newest
    assert supported.check_installed("train", {"transformers": oldest, "peft": ranges["peft"].newest}) == []
    warnings = supported.check_installed("train", {"transformers": "99.0.0"})
    assert len(warnings) == 1 and f"up to {newest}" in warnings[0] and f"transformers=={newest}" in warnings[0]
    with pytest.raises(SameboxError) as e:
        supported.check_installed("train", {"transformers": "4.30.0", "peft": "0.10.0", "accelerate": None})
    text = str(e.value)
    assert "transformers 4.30.0 is older than " + oldest in text and "peft 0.10.0" in text
    assert f"'transformers>={oldest},<={newest}'" in text
    # serve needs `transformers serve` as samebox drives it, whatever the catalog's oldest lock pins
    with pytest.raises(SameboxError, match="older than 5.17"):
        supported.check_installed("serve", {"transformers": "5.0.0"})
    assert supported.check_installed("serve", {"transformers": "5.17.0"}) == []
    # a patch release below the oldest pin, of the same minor, is the same API: accepted
    peft_oldest = Version(ranges["peft"].oldest)
    same_minor = f"{peft_oldest.major}.{peft_oldest.minor}.0"
    assert supported.check_installed("export", {"peft": same_minor}) == []


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("command", [["train", "nonexistent.yaml"], ["serve", "nonexistent-run"],
                                     ["export", "nonexistent-run", "--merge", "out"]])
def test_a_command_outside_the_range_stops_at_start_with_exit_2(tmp_path: Path, command: list[str]) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "transformers", "4.30.0")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "builder", *command], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "transformers 4.30.0 is older than" in proc.stderr and "pip install 'transformers>=" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_an_unknown_transformers_serve_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.cli.serve as tf_serve

    from trainer.serve import server as serve

    assert serve.transformers_dialect() in ("in-process", "engine-process")

    class Other:
        def __init__(self, model: str) -> None:
            pass

    monkeypatch.setattr(tf_serve, "Serve", Other)
    with pytest.raises(SameboxError, match="not one samebox knows how to drive") as e:
        serve.transformers_dialect()
    assert "pip install 'transformers>=5.17" in str(e.value)


@pytest.mark.integration
@pytest.mark.network
@pytest.mark.slow
def test_serve_at_the_oldest_transformers_a_lock_pins(tmp_path: Path) -> None:
    """The serve tests again, with the oldest `transformers serve` a catalog lock pins (its wheel and hash from
    that lock, installed over the dev venv's): the bottom of serve's range runs too, not only the dev lock's top."""
    floor = Version(supported.SERVE_TRANSFORMERS_FLOOR)
    pins = []
    for path in sorted((REPO / "lockfiles").glob("torch*.txt")):
        if path.name.endswith(".workstation.txt"):
            continue
        version = read_lock(path).get("transformers")
        if version and Version(version) >= floor:
            pins.append((Version(version), version, path))
    _, version, lock = min(pins)
    assert version != read_lock(REPO / devlock.DEV_LOCK)["transformers"], "the bottom of the range is the top"
    text = lock.read_text()
    start = text.index(f"transformers=={version}")
    block = text[start:text.index("\n    #", start)]
    req = tmp_path / "req.txt"
    req.write_text(block + "\n")
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--require-hashes", "--target", str(target), "-r", str(req)],
                         capture_output=True, text=True)
    require(pip.returncode == 0, f"PyPI unreachable, cannot fetch transformers {version}: {pip.stderr[-500:]}")
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{REPO}", "SAMEBOX_TEST_TRANSFORMERS": version}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           "tests/serve/test_serve_http.py", "tests/serve/test_serve_input.py",
                           "tests/serve/test_serve_load.py"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout

