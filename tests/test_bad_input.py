"""Bad input to the builder's commands exits 2 with what would work, never a traceback: files that are not UTF-8
(fingerprints, lockfiles, the catalog, setup.sh's helpers), a fingerprint of the wrong shape, an --output that is
a directory or under a file; `--engine none` prints a build command that runs as printed; `lock --check` sees a pin
edited by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import main
from builder.core.spec import find_image, load_catalog
from builder.image import lock
from tests.conftest import REPO

TEST_ROOT = REPO / "tests" / "fixtures" / "catalog"
IMAGE = "test-bookworm-py311"
GBK = "# 锁文件\n".encode("gbk")  # what a Windows editor in a Chinese locale saves


def _test_catalog(tmp_path: Path) -> Path:
    root = tmp_path / "cat"
    shutil.copytree(TEST_ROOT, root)
    return root


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_files_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp = tmp_path / "fp.json"
    fp.write_bytes(b'{"schema": 1, "note": "' + "显卡".encode("gbk") + b'"}')
    _fails_cleanly(["diff", str(fp), str(fp)], capsys, f"fingerprint {fp} is not UTF-8 text (line 1",
                   "samebox fingerprint -o FILE")

    root = _test_catalog(tmp_path)
    lockfile = root / "lockfiles" / f"{IMAGE}.txt"
    lockfile.write_bytes(lockfile.read_bytes() + GBK)
    _fails_cleanly(["lock", "--check", "--root", str(root)], capsys, f"lockfile {lockfile} is not UTF-8",
                   f"samebox lock --root {root} --image {IMAGE}")
    _fails_cleanly(["verify", "--lockfile", str(lockfile)], capsys, "is not UTF-8", "samebox lock")
    _fails_cleanly(["selftest", "--lockfile", str(lockfile)], capsys, "is not UTF-8", "samebox lock")

    matrix = root / "images" / "matrix.toml"
    matrix.write_bytes(GBK + matrix.read_bytes())
    _fails_cleanly(["images", "--root", str(root)], capsys, f"catalog {matrix} is not UTF-8 text (line 1")

    config = tmp_path / "train.yaml"
    config.write_bytes(b"model:\n  name: " + "千问".encode("gbk") + b"\n")
    _fails_cleanly(["train", str(config), "--no-preflight"], capsys, f"{config}: not UTF-8 text", "UTF-8")


def test_setup_scripts_helpers_exit_2_on_a_non_utf8_lock_or_catalog(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(GBK)
    for argv in (["builder.instance.drift", "plan", "--lock", str(bad), "--out", str(tmp_path / "todo.txt")],
                 ["builder.instance.converge", "--catalog", str(bad), "--python", sys.executable,
                  "--samebox-src", str(REPO)]):
        out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SAMEBOX_STATE": str(tmp_path / "state")})
        assert out.returncode == 2 and "not UTF-8" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(("document", "expected"), [
    ([1, 2], "the document is a JSON list, not an object"),
    ({"schema": 1}, "no 'packages' section"),
    ({"schema": 2, "packages": {}}, "schema is 2, not 1"),
    ("packages-as-list", "packages is a JSON list"),
    ("package-without-version", "packages.jinja2 lacks a string version and record"),
])
def test_diff_on_json_of_the_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str], document: object,
                                         expected: str) -> None:
    good = tmp_path / "good.json"
    assert main(["fingerprint", "--no-files", "-o", str(good)]) == 0
    fp = json.loads(good.read_text())
    if document == "packages-as-list":
        document = {**fp, "packages": ["jinja2"]}
    elif document == "package-without-version":
        document = {**fp, "packages": {**fp["packages"], "jinja2": {"record": ""}}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    _fails_cleanly(["diff", str(good), str(bad)], capsys, f"{bad} is not a samebox fingerprint", expected)


def test_output_that_is_a_directory_or_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv in (["fingerprint", "--no-files", "-o", str(tmp_path)],
                 ["fingerprint", "--no-files", "-o", str(a_file / "fp.json")],
                 ["setup-script", "-o", str(tmp_path)]):
        _fails_cleanly(argv, capsys, "cannot write", "writable directory")
    root = _test_catalog(tmp_path)
    for out in (a_file, a_file / "ctx"):
        _fails_cleanly(["render", "--root", str(root), "--image", IMAGE, "--output", str(out)], capsys, str(out))
        _fails_cleanly(["image", "--root", str(root), "--image", IMAGE, "--engine", "none", "--output", str(out)],
                       capsys, str(out))
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cat"]


def test_engine_none_prints_a_command_that_runs_as_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:secret@mirror.example/simple")
    monkeypatch.chdir(tmp_path)
    assert main(["image", "--root", str(TEST_ROOT), "--image", IMAGE, "--engine", "none", "--output", "ctx",
                 "--ca-bundle", str(ca)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1].strip()
    assert printed.startswith("DOCKER_BUILDKIT=1 docker build ")
    assert f"--secret id=ca_bundle,src={ca}" in printed and "CA.pem" not in printed
    assert "--secret id=pip_index_url,env=PIP_INDEX_URL" in printed and "secret@" not in printed
    assert f"-f {tmp_path / 'ctx' / 'Dockerfile'} {tmp_path / 'ctx'}" in printed  # runs from any directory
    _fails_cleanly(["image", "--root", str(TEST_ROOT), "--image", IMAGE, "--engine", "none", "--output", "ctx2",
                    "--ca-bundle", str(tmp_path / "missing.pem")], capsys, "CA bundle not found")
    assert not (tmp_path / "ctx2").exists()


def test_lock_check_sees_a_pin_edited_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _test_catalog(tmp_path)
    assert main(["lock", "--check", "--root", str(root)]) == 0
    spec = find_image(IMAGE, load_catalog(root))
    text = spec.lockfile.read_text()
    edited = text.replace("jinja2==3.1.6", "jinja2==3.1.5")
    assert edited != text
    spec.lockfile.write_text(edited)
    capsys.readouterr()
    assert main(["lock", "--check", "--root", str(root)]) == 1
    status = lock.check_lock(spec)
    assert status.state == "stale" and "edited by hand" in status.reason
    assert "edited by hand" in capsys.readouterr().out
    header, body = lock.split_lock(text)
    spec.lockfile.write_text(header.replace("# content-sha256:", "# content-sha256 was:") + body)
    assert "no content-sha256" in lock.check_lock(spec).reason
