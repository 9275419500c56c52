"""Reproducible builds without a daemon: how each engine stamps the build date (or says it cannot), the label, the
two builds' tags, and the comparison of two docker-archives down to the first differing layer and its files."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.image.engine import (
    BUILDKIT,
    BUILDX,
    DAEMONLESS,
    BuildRequest,
    Engine,
    ImageInfo,
    Stamping,
    _read_buildah_inspect,
    _read_docker_inspect,
)
from builder.image.reproducible import (
    REPRODUCIBLE_LABEL,
    SOURCE_DATE_EPOCH,
    compare_images,
    labels,
    rebuild_request,
)

TEST_ROOT = Path(__file__).resolve().parent / "fixtures" / "catalog"


def _fake_docker(directory: Path, buildkit: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "docker"
    fake.write_text(f'#!/bin/sh\n[ "$2" = inspect ] && printf "Name: default\\nBuildKit version: {buildkit}\\n"\n'
                    "exit 0\n")
    fake.chmod(0o755)
    return fake


def test_each_driver_stamps_the_build_date_or_says_why_not(tmp_path: Path) -> None:
    assert Engine("buildah", "buildah", DAEMONLESS).stamping(SOURCE_DATE_EPOCH).args == (
        "--timestamp", str(SOURCE_DATE_EPOCH))
    embedded = Engine("docker", "docker", BUILDKIT).stamping(SOURCE_DATE_EPOCH)
    assert embedded.args == () and "embedded BuildKit" in embedded.missing
    new = Engine("docker", str(_fake_docker(tmp_path / "new", "v0.13.2")), BUILDX).stamping(SOURCE_DATE_EPOCH)
    assert new == Stamping(("--output", "type=docker,rewrite-timestamp=true"))
    old = Engine("docker", str(_fake_docker(tmp_path / "old", "v0.12.5")), BUILDX).stamping(SOURCE_DATE_EPOCH)
    assert old.args == () and "BuildKit v0.12" in old.missing and "0.13" in old.missing


def test_stamping_args_replace_the_load_and_labels_are_passed(tmp_path: Path) -> None:
    req = BuildRequest(context=tmp_path, tag="t", labels={REPRODUCIBLE_LABEL: "yes: x"})
    stamped = Engine("docker", "docker", BUILDX).build_argv(req, {}, stamping=Stamping(("--output", "type=docker")))
    assert "--load" not in stamped and stamped[4:6] == ["--output", "type=docker"]
    assert stamped[stamped.index("--label") + 1] == f"{REPRODUCIBLE_LABEL}=yes: x"
    plain = Engine("docker", "docker", BUILDX).build_argv(req, {}, stamping=Stamping(missing="old"))
    assert "--load" in plain


def test_label_says_how_or_why_not() -> None:
    assert labels(Stamping(("--timestamp", "1"))) == {
        REPRODUCIBLE_LABEL: f"yes: SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}, --timestamp 1"}
    assert labels(Stamping(missing="it cannot")) == {REPRODUCIBLE_LABEL: "no: it cannot"}


def test_the_two_builds_skip_the_layer_cache_under_two_tags(tmp_path: Path) -> None:
    req = BuildRequest(context=tmp_path, tag="samebox:x-1", push=True)
    first, second = rebuild_request(req)
    assert (first.tag, second.tag) == ("samebox:x-1", "samebox:x-1-rebuild")
    assert first.no_cache and second.no_cache and not first.push and not second.push
    assert rebuild_request(BuildRequest(context=tmp_path, tag="registry:5000/team/img"))[1].tag == \
        "registry:5000/team/img:rebuild"


def test_inspect_output_of_docker_and_buildah_is_read_alike() -> None:
    docker = [{"Id": "sha256:aa", "RootFS": {"Layers": ["sha256:1", "sha256:2"]}, "Config": {"Labels": {"k": "v"}}}]
    assert _read_docker_inspect(docker) == ImageInfo("sha256:aa", ("sha256:1", "sha256:2"), {"k": "v"})
    buildah = {"FromImageID": "bb", "OCIv1": {"rootfs": {"diff_ids": ["sha256:1"]}, "config": {"Labels": None}}}
    assert _read_buildah_inspect(buildah) == ImageInfo("sha256:bb", ("sha256:1",), {})


def test_verify_reproducible_refuses_an_engine_that_cannot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from builder.cli import main

    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = version ] && echo 20.10.24 && exit 0\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv("SAMEBOX_DOCKER", raising=False)
    assert main(["image", "--root", str(TEST_ROOT), "--image", "test-bookworm-py311", "--verify-reproducible",
                 "--output", str(tmp_path / "ctx")]) == 2
    err = capsys.readouterr().err
    assert "cannot build reproducibly" in err and "--engine buildah" in err
    assert not (tmp_path / "ctx").exists(), "nothing written"


# --- comparison of two docker-archives (what `docker save` and `buildah push docker-archive:` write)

def _tar(entries: dict[str, tuple[bytes | None, int]]) -> bytes:
    """path -> (content, or None for a directory; mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (content, mtime) in entries.items():
            info = tarfile.TarInfo(path)
            info.mtime = mtime
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _archive(path: Path, layers: list[bytes], history: list[str], created: str = "2024-01-01T00:00:00Z") -> None:
    config = {"created": created, "config": {"Labels": {"a": "b"}},
              "history": [{"created_by": h} for h in history] + [{"created_by": "LABEL x", "empty_layer": True}]}
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("config.json", json.dumps(config).encode())
        for i, layer in enumerate(layers):
            add(f"{i}/layer.tar", layer)
        add("manifest.json", json.dumps([{"Config": "config.json",
                                          "Layers": [f"{i}/layer.tar" for i in range(len(layers))]}]).encode())


@dataclass
class FakeEngine:
    """Answers image() and save() from prepared archives, as an engine's store would."""

    images: dict[str, tuple[ImageInfo, Path]]
    saved: list[str] = field(default_factory=list)
    name: str = "fake"

    def image(self, ref: str) -> ImageInfo | None:
        return self.images[ref][0] if ref in self.images else None

    def save(self, ref: str, archive: Path) -> None:
        self.saved.append(ref)
        archive.write_bytes(self.images[ref][1].read_bytes())


BASE = _tar({"etc": (None, 0), "etc/os-release": (b"bookworm", 0)})


def test_the_first_differing_layer_and_its_files_are_named(tmp_path: Path) -> None:
    same = _tar({"opt": (None, 1), "opt/lock.txt": (b"six==1.17.0", 1)})
    a_top = _tar({"opt": (None, 1), "opt/planted": (b"1", 1), "opt/pkg.pyc": (b"x", 1), "opt/only-a": (b"", 1)})
    b_top = _tar({"opt": (None, 1), "opt/planted": (b"2", 1), "opt/pkg.pyc": (b"x", 7)})
    _archive(tmp_path / "a.tar", [BASE, same, a_top], ["COPY lock", "RUN plant"])
    _archive(tmp_path / "b.tar", [BASE, same, b_top], ["COPY lock", "RUN plant"])
    engine = FakeEngine({"a": (ImageInfo("sha256:a", ("l0", "l1", "la"), {}), tmp_path / "a.tar"),
                         "b": (ImageInfo("sha256:b", ("l0", "l1", "lb"), {}), tmp_path / "b.tar")})
    work = tmp_path / "work"
    comparison = compare_images(engine, "a", "b", work)
    assert not comparison.same and comparison.layer == 2 and comparison.made_by == "RUN plant"
    assert [(d.path, d.what) for d in comparison.files] == [
        ("opt/only-a", "only in the first"), ("opt/pkg.pyc", "mtime 1 != 7"), ("opt/planted", "content")]
    report = comparison.report()
    assert "first differing layer: 3 of 3, made by: RUN plant" in report and "opt/planted: content" in report
    assert "la != lb" in report
    assert list(work.iterdir()) == [], "the exported archives are removed"
    assert "by their time only" not in report


def test_a_difference_of_file_times_only_says_the_date_was_not_stamped(tmp_path: Path) -> None:
    _archive(tmp_path / "a.tar", [BASE, _tar({"opt": (None, 1)})], ["RUN venv"])
    _archive(tmp_path / "b.tar", [BASE, _tar({"opt": (None, 2)})], ["RUN venv"])
    engine = FakeEngine({"a": (ImageInfo("sha256:a", ("l0", "la"), {}), tmp_path / "a.tar"),
                         "b": (ImageInfo("sha256:b", ("l0", "lb"), {}), tmp_path / "b.tar")})
    report = compare_images(engine, "a", "b", tmp_path / "work").report()
    assert "1 file(s) differ in it by their time only: the engine did not stamp the build date:" in report


def test_built_image_takes_entry_and_lock_from_its_labels(capsys: pytest.CaptureFixture) -> None:
    from builder.cli import main

    assert main(["verify", "--built-image", "samebox:x", "--image", "test-bookworm-py311"]) == 2
    assert "leave out --image and --lockfile" in capsys.readouterr().err


def test_same_image_is_not_exported_and_a_config_difference_is_named(tmp_path: Path) -> None:
    _archive(tmp_path / "a.tar", [BASE], [], created="2024-01-01T00:00:00Z")
    _archive(tmp_path / "b.tar", [BASE], [], created="2026-12-05T17:00:00Z")
    same = FakeEngine({"a": (ImageInfo("sha256:a", ("l0",), {}), tmp_path / "a.tar"),
                       "a2": (ImageInfo("sha256:a", ("l0",), {}), tmp_path / "a.tar")})
    comparison = compare_images(same, "a", "a2", tmp_path / "work")
    assert comparison.same and same.saved == [] and "are the same image, sha256:a" in comparison.report()
    differ = FakeEngine({"a": (ImageInfo("sha256:a", ("l0",), {}), tmp_path / "a.tar"),
                         "b": (ImageInfo("sha256:b", ("l0",), {}), tmp_path / "b.tar")})
    comparison = compare_images(differ, "a", "b", tmp_path / "work")
    assert comparison.layer is None and comparison.config == ("created",)
    assert "every layer is the same; the image config differs in: created" in comparison.report()


def test_a_missing_image_is_a_user_error(tmp_path: Path) -> None:
    from builder.core.errors import SameboxError

    with pytest.raises(SameboxError, match="fake has no image nope"):
        compare_images(FakeEngine({}), "nope", "other", tmp_path)
