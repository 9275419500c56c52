"""The thin commands end to end through the real CLI: fingerprint, diff, verify, check-gpu, setup-script."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

from builder.cli import main
from builder.core.environment import Environment, TorchBuild
from tests.conftest import REPO
from tests.fingerprint.fakesite import lock_line

ENTRY = """
[[image]]
id = "test-local"
torch = "none"
torch_local = "none"
cuda = "none"
cudnn = "none"
python = "{python}"
os = "debian12"
base_image = "samebox-test/bookworm-python:latest"
python_provider = "system"
archs = ["8.0"]
flash_attn = "none"
torch_index = "pypi"
platforms = ["test: this interpreter"]
"""


def _catalog(tmp_path: Path, lock: str) -> Path:
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "lockfiles").mkdir()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / "images" / "matrix.toml").write_text(ENTRY.format(python=python))
    (tmp_path / "lockfiles" / "test-local.txt").write_text(lock)
    return tmp_path


def test_fingerprint_then_diff(tmp_path: Path, capsys) -> None:
    a = tmp_path / "a.json"
    assert main(["fingerprint", "--no-files", "-o", str(a)]) == 0
    assert main(["diff", str(a), str(a)]) == 0
    assert capsys.readouterr().out.strip().endswith("drift: none")
    fp = json.loads(a.read_text())
    fp["packages"]["jinja2"]["version"] = "0.1"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(fp))
    assert main(["diff", str(a), str(b), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["drift"] and report["groups"]["packages changed"][0]["what"] == "jinja2"
    assert main(["diff", str(a), str(tmp_path / "none.json")]) == 2


def test_verify_against_a_lockfile(tmp_path: Path, capsys, monkeypatch) -> None:
    good = lock_line("jinja2", md.version("jinja2")) + lock_line("packaging", md.version("packaging"))
    root = _catalog(tmp_path, good)
    assert main(["verify", "--root", str(root), "--image", "test-local"]) == 0
    assert "matches" in capsys.readouterr().out
    monkeypatch.delenv("SAMEBOX_IMAGE", raising=False)
    monkeypatch.delenv("SAMEBOX_LOCKFILE", raising=False)
    real = Environment.probe(torch=False, gpus=False)
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls, **_: real))
    assert main(["verify", "--root", str(root)]) == 0  # found by matching the platform (no torch, this Python)
    other = dataclasses.replace(real, torch=TorchBuild(version="2.3.0+cu121", cuda="12.1"))
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls, **_: other))
    assert main(["verify", "--root", str(root)]) == 2
    assert "no catalog image replicates this instance" in capsys.readouterr().err
    (root / "lockfiles" / "test-local.txt").write_text(good + lock_line("jinja2", "0.1") + lock_line("nope", "1"))
    assert main(["verify", "--root", str(root), "--image", "test-local", "--json", "--no-files"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == [f"jinja2 is {md.version('jinja2')}, the lock has 0.1",
                               "nope 1 is locked but not installed"]


def test_verify_with_a_named_lock_does_not_import_torch(tmp_path: Path, capsys, monkeypatch) -> None:
    import builder.core.environment as environment

    good = lock_line("jinja2", md.version("jinja2"))
    root = _catalog(tmp_path, good)

    def no_torch(**_):
        raise AssertionError("verify asked torch although the lock was named")

    monkeypatch.setattr(environment, "probe_torch", no_torch)
    assert main(["verify", "--root", str(root), "--image", "test-local", "--no-files"]) == 0
    assert main(["verify", "--root", str(root), "--lockfile", str(root / "lockfiles" / "test-local.txt"),
                 "--no-files"]) == 0
    monkeypatch.setenv("SAMEBOX_LOCKFILE", str(root / "lockfiles" / "test-local.txt"))
    assert main(["verify", "--root", str(root), "--no-files"]) == 0
    assert "matches" in capsys.readouterr().out


def test_check_gpu_json(capsys) -> None:
    assert main(["check-gpu", "--gpu", "H20", "--driver", "550.54.14", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"] == "H20" and report["best"] == "torch2.5-cu124-py312"
    assert main(["check-gpu", "--gpu", "Voodoo 2"]) == 2


def test_root_setup_sh_is_the_rendered_template(tmp_path: Path) -> None:
    out = tmp_path / "setup.sh"
    assert main(["setup-script", "-o", str(out)]) == 0
    assert out.read_text() == (REPO / "setup.sh").read_text(), "regenerate: samebox setup-script -o setup.sh"
    assert (REPO / "setup.sh").stat().st_mode & 0o111


def test_standalone_setup_script_embeds_entry_and_lock(tmp_path: Path) -> None:
    lock = lock_line("jinja2", "3.1.4")
    root = _catalog(tmp_path / "cat", lock)
    one, two = tmp_path / "one.sh", tmp_path / "two.sh"
    assert main(["setup-script", "--root", str(root), "--image", "test-local", "-o", str(one)]) == 0
    assert main(["setup-script", "--root", str(root), "--image", "test-local", "-o", str(two)]) == 0
    text = one.read_text()
    assert text == two.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# AUTO GENERATED by `samebox setup-script --image test-local")
    assert 'IMAGE="test-local"' in text and lock in text and '"flash_attn": "none"' in text
    subprocess.run(["bash", "-n", str(one)], check=True)
    (root / "lockfiles" / "test-local.txt").unlink()
    assert main(["setup-script", "--root", str(root), "--image", "test-local", "-o", str(one)]) == 2
    assert one.read_text() == text  # nothing half-written


def test_setup_script_refuses_bad_options_with_exit_2(tmp_path: Path) -> None:
    script = REPO / "setup.sh"
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args, message in [
        (["--offline"], "--offline needs --wheelhouse DIR"),
        (["--wheelhouse", str(tmp_path / "no")], "is not a directory"),
        (["--min-free-mb", "lots"], "must be a number"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ]:
        run = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
