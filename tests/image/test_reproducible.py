"""Integration: the same lock builds the same image, bit for bit (buildah, which stamps the build date on every file
and on the history), a changed pin builds another, and a planted difference is named by layer and file."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from builder.core.fsutil import sha256_file
from builder.image.engine import DAEMONLESS, Engine
from builder.image.reproducible import REPRODUCIBLE_LABEL, SOURCE_DATE_EPOCH, compare_images
from tests.harness import (  # noqa: F401
    TEST_IMAGE_ID,
    TEST_ROOT,
    Buildah,
    Docker,
    build_test_image,
    buildah,
    docker,
    test_base_image,
)
from tests.image.test_image_build import _copy_checkout

pytestmark = pytest.mark.docker
# six 1.16.0's wheel (the test lock pins 1.17.0): one changed pin.
SIX_16 = "six==1.16.0 \\\n    --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n"


def _engine(buildah: Buildah) -> Engine:  # noqa: F811
    return Engine("buildah", buildah.binary, DAEMONLESS)


def _built_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^samebox: built (\S+), image id (sha256:[0-9a-f]{64})", stdout, re.M))


@pytest.fixture(scope="module")
def verified(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """`samebox image --engine buildah --verify-reproducible`: two builds without the layer cache, compared."""
    out = tmp_path_factory.mktemp("repro")
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    proc = build_test_image(out / TEST_IMAGE_ID, tag, buildah.env, TEST_ROOT, "--engine", "buildah",
                            "--verify-reproducible")
    yield {"tag": tag, "proc": proc}
    buildah("rmi", "--force", tag, check=False)


def test_two_clean_builds_give_the_same_image(buildah: Buildah, verified: dict) -> None:  # noqa: F811
    proc, tag = verified["proc"], verified["tag"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = _built_ids(proc.stdout)
    assert set(ids) == {tag, f"{tag}-rebuild"}, proc.stdout
    assert ids[tag] == ids[f"{tag}-rebuild"]
    assert f"reproducible: {tag} and {tag}-rebuild are the same image, {ids[tag]}" in proc.stdout
    # Both builds ran every step: no layer came from a cache.
    assert proc.stderr.count("--no-cache") == 2 and "Using cache" not in proc.stderr
    assert f"--timestamp {SOURCE_DATE_EPOCH}" in proc.stderr
    engine = _engine(buildah)
    image = engine.image(tag)
    assert image is not None and image.id == ids[tag]
    assert engine.image(f"{tag}-rebuild") is None, "the second tag is removed once the two agree"
    assert image.labels[REPRODUCIBLE_LABEL].startswith("yes: SOURCE_DATE_EPOCH=")
    assert image.labels["io.samebox.lock-sha256"] == sha256_file(TEST_ROOT / "lockfiles" / f"{TEST_IMAGE_ID}.txt")


def test_one_changed_pin_gives_another_image(buildah: Buildah, verified: dict, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "catalog"
    shutil.copytree(TEST_ROOT, root)
    lock = root / "lockfiles" / f"{TEST_IMAGE_ID}.txt"
    text = lock.read_text()
    changed = re.sub(r"six==1\.17\.0 \\\n(    --hash=\S+ \\\n)*    --hash=\S+\n", SIX_16, text)
    assert changed != text and "six==1.16.0" in changed
    lock.write_text(changed)
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    proc = build_test_image(tmp_path / "out" / TEST_IMAGE_ID, tag, buildah.env, root, "--engine", "buildah",
                            "--allow-stale")
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        engine = _engine(buildah)
        other, same = engine.image(tag), engine.image(verified["tag"])
        assert other is not None and same is not None and other.id != same.id
        comparison = compare_images(engine, verified["tag"], tag, tmp_path / "compare")
        # The first layer that differs is the lock's own copy; the report says which file.
        assert "/opt/samebox/lock.txt" in comparison.made_by
        assert [(d.path, d.what) for d in comparison.files] == [("opt/samebox/lock.txt", "content")]
        assert not list((tmp_path / "compare").iterdir()), "the exported archives are removed"
    finally:
        buildah("rmi", "--force", tag, check=False)


def test_planted_difference_is_named_by_layer_and_file(buildah: Buildah, tmp_path: Path) -> None:  # noqa: F811
    """A template whose final stage writes random bytes: the check must fail and point at that step and file."""
    checkout = _copy_checkout(tmp_path / "checkout")
    template = checkout / "images" / "Dockerfile.j2"
    text = template.read_text()
    anchor = "FROM deps AS final\nARG SOURCE_DATE_EPOCH\n"
    assert anchor in text
    template.write_text(text.replace(anchor, anchor + "RUN od -An -N16 -tx1 /dev/urandom > /opt/samebox/planted\n"))
    tag = f"samebox-test:{uuid.uuid4().hex[:8]}"
    proc = build_test_image(tmp_path / "out" / TEST_IMAGE_ID, tag, {**buildah.env, "SAMEBOX_ROOT": str(checkout)},
                            checkout / "catalog", "--engine", "buildah", "--verify-reproducible")
    try:
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = proc.stdout[proc.stdout.index("samebox: NOT reproducible"):]
        assert re.search(r"^first differing layer: \d+ of \d+, made by: .*/opt/samebox/planted", report, re.M), report
        assert "1 file(s) differ in it:\n  opt/samebox/planted: content" in report
        engine = _engine(buildah)
        assert engine.image(tag) is not None and engine.image(f"{tag}-rebuild") is not None, "both kept to inspect"
    finally:
        buildah("rmi", "--force", tag, f"{tag}-rebuild", check=False)


def test_verify_built_image_runs_inside_a_buildah_container(buildah: Buildah, verified: dict) -> None:  # noqa: F811
    from tests.harness import samebox

    proc = samebox("verify", "--root", str(TEST_ROOT), "--engine", "buildah", "--built-image", verified["tag"],
                   "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["image"] == TEST_IMAGE_ID and report["reproducible"].startswith("yes:")
    assert buildah("containers", "--quiet").stdout.strip() == "", "the working container is removed"
