"""What the README and docs/image.md show is what the commands print, and what they promise of the Makefile holds."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from builder.cli import main
from tests.conftest import REPO, require

README = (REPO / "README.md").read_text()
IMAGE_DOC = (REPO / "docs" / "image.md").read_text()


def _block_after(command: str, document: str = README) -> str:
    """The output a document shows under ``$ command`` in a code block."""
    found = re.search(rf"^\$ {re.escape(command)}\n(.*?)^```", document, re.M | re.S)
    assert found, f"no output of `{command}` shown"
    return found.group(1)


@pytest.mark.parametrize("document", [README, IMAGE_DOC], ids=["README.md", "docs/image.md"])
def test_readme_catalog_is_what_samebox_images_prints(document: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images"]) == 0
    assert _block_after("samebox images", document) == capsys.readouterr().out


def test_docs_image_tag_is_the_current_one(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    shown = _block_after("samebox image --torch 2.3 --engine none          # in a checkout at /root/samebox, on a "
                         "host with a proxy CA", IMAGE_DOC).splitlines()[0]
    assert main(["image", "--torch", "2.3", "--engine", "none", "--output", str(tmp_path / "ctx")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == shown


def test_make_image_forwards_conda_mirror() -> None:
    require(shutil.which("make") is not None, "make is not installed")
    mirror = "https://mirrors.tuna.tsinghua.edu.cn/anaconda/miniconda/"
    out = subprocess.run(["make", "-n", "image", "TORCH=2.3", f"CONDA_MIRROR={mirror}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"--conda-mirror '{mirror}'" in out.stdout
    plain = subprocess.run(["make", "-n", "image", "TORCH=2.3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--conda-mirror" not in plain.stdout
