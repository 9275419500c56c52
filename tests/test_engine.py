"""Engine selection, build command construction, secret handling and `--engine none` — no daemon needed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from builder.image.engine import (
    BUILDKIT,
    BUILDX,
    DAEMONLESS,
    ENGINES,
    BuildRequest,
    Engine,
    EngineKind,
    detect_engine,
    secret_files,
)


def test_buildkit_argv_carries_secrets_as_files_and_base_override(tmp_path: Path) -> None:
    req = BuildRequest(context=tmp_path, tag="samebox:x", base_image="local/base:1",
                       build_args={"CONDA_MIRROR": "https://mirror.example/miniconda/"})
    argv = Engine("docker", "/usr/bin/docker", BUILDKIT).build_argv(req, {"ca_bundle": Path("/ca.pem")})
    assert argv[:2] == ["/usr/bin/docker", "build"]
    assert "--secret" in argv and "id=ca_bundle,src=/ca.pem" in argv
    assert "BASE_IMAGE=local/base:1" in argv and "CONDA_MIRROR=https://mirror.example/miniconda/" in argv
    assert argv[-1] == str(tmp_path) and argv[argv.index("-t") + 1] == "samebox:x"
    assert Engine("docker", "d", BUILDKIT).env()["DOCKER_BUILDKIT"] == "1"


def test_buildx_and_daemonless_argv(tmp_path: Path) -> None:
    req = BuildRequest(context=tmp_path, tag="t", network_host=False)
    argv = Engine("docker", "docker", BUILDX).build_argv(req, {})
    assert argv[:3] == ["docker", "buildx", "build"] and "--load" in argv
    for name in ("podman", "buildah"):
        argv = Engine(name, name, DAEMONLESS).build_argv(req, {})
        assert argv[:3] == [name, "build", "--layers"] and "--network" not in argv


def test_secret_values_live_only_in_private_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:tok@mirror.example/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with secret_files(None) as secrets:
        path = secrets["pip_index_url"]
        assert path.read_text() == "https://user:tok@mirror.example/simple"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "pip_extra_index_url" not in secrets
    assert not path.exists()


def test_unknown_engine() -> None:
    with pytest.raises(SameboxError, match="unknown engine"):
        detect_engine("rkt")


def test_no_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SAMEBOX_DOCKER", raising=False)
    with pytest.raises(SameboxError) as e:
        detect_engine("docker")
    assert "docker.io" in e.value.hint and "--engine none" in e.value.hint
    with pytest.raises(SameboxError, match="podman not found"):
        detect_engine("podman")


def test_docker_client_without_buildx_is_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 28.2.2 && exit 0\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SAMEBOX_DOCKER", raising=False)
    with pytest.raises(SameboxError, match="without the buildx plugin"):
        detect_engine("docker")
    fake.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 20.10.24 && exit 0\nexit 1\n")
    assert detect_engine("docker").driver is BUILDKIT


def _fake_client(directory: Path, name: str, script: str = "exit 0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / name
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return fake


def test_docker_prefers_buildx_and_samebox_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on_path = _fake_client(tmp_path / "bin", "docker")  # `docker buildx version` exits 0
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("SAMEBOX_DOCKER", raising=False)
    assert detect_engine("docker") == Engine("docker", str(on_path), BUILDX)
    chosen = _fake_client(tmp_path / "other", "docker")
    monkeypatch.setenv("SAMEBOX_DOCKER", str(chosen))
    assert detect_engine("docker").binary == str(chosen)


def test_a_new_engine_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(ENGINES, "kaniko", EngineKind("kaniko", "install kaniko", (DAEMONLESS,)))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SAMEBOX_KANIKO", raising=False)
    with pytest.raises(SameboxError, match="kaniko not found on PATH") as e:
        detect_engine("kaniko")
    assert e.value.hint.startswith("install kaniko; or pick --engine docker|podman|buildah, or --engine none")
    fake = _fake_client(tmp_path, "kaniko")
    engine = detect_engine("kaniko")
    assert engine == Engine("kaniko", str(fake), DAEMONLESS)
    assert engine.build_argv(BuildRequest(context=tmp_path, tag="t"), {})[:3] == [str(fake), "build", "--layers"]


def test_engine_none_writes_context_and_prints_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from builder.cli import main

    root = Path(__file__).resolve().parent / "fixtures" / "catalog"
    out = tmp_path / "ctx"
    assert main(["image", "--root", str(root), "--image", "test-bookworm-py311", "--engine", "none",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DOCKER_BUILDKIT=1 docker build" in printed
    assert (out / "Dockerfile").is_file() and (out / "src" / "builder" / "cli" / "__init__.py").is_file()
    assert (out / "test-bookworm-py311.lock.txt").read_bytes() == (root / "lockfiles" / "test-bookworm-py311.txt"
                                                                   ).read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temp dirs left behind"


def test_missing_lockfile_says_how_to_make_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from builder.cli import main

    root = tmp_path / "cat"
    shutil.copytree(Path(__file__).resolve().parent / "fixtures" / "catalog" / "images", root / "images")
    assert main(["image", "--root", str(root), "--image", "test-bookworm-py311", "--engine", "none",
                 "--output", str(tmp_path / "ctx")]) == 2
    assert f"samebox lock --root {root} --image test-bookworm-py311" in capsys.readouterr().err
    assert not (tmp_path / "ctx").exists()


def test_ca_bundle_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from builder.image.engine import ca_bundle_path

    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    from builder.core.pyindex import CA_ENV_VARS

    for var in CA_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert ca_bundle_path() is None
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    assert ca_bundle_path() == pem
    with pytest.raises(SameboxError, match="CA bundle not found"):
        ca_bundle_path(os.fspath(tmp_path / "missing.pem"))
