"""The real uv against indexes: a local stand-in for a PyTorch variant index (127.0.0.1, no network), and one
`uv pip compile` of the test catalog against PyPI (marked network; CI has PyPI). Also the metadata reader and the
declared-torch-bound check on their own.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.core import pyindex
from builder.core.errors import SameboxError
from builder.core.spec import load_catalog
from builder.image import lock, torchbounds
from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent
TEST_ROOT = REPO / "tests" / "fixtures" / "catalog"

ENTRY = """
[[image]]
id = "t23"
torch = "2.3.0"
torch_local = "cu118"
cuda = "11.8"
cudnn = "8.7"
python = "3.12"
os = "ubuntu22.04"
base_image = "nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04"
python_provider = "system"
archs = ["8.0"]
flash_attn = "2.6.3"
torch_index = "{index}"
platforms = []
"""


def have_uv() -> bool:
    try:
        lock.find_uv()
    except SameboxError:
        return False
    return True


def wheel(directory: Path, name: str, version: str, requires: list[str], extras: list[str] = ()) -> Path:
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA", "\n".join(meta) + "\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def simple_index(root: Path, index: str, wheels: list[Path]) -> None:
    """A PEP 503 HTML index at root/index/ whose links point at root/files/ (no PEP 658 .metadata files)."""
    files = root / "files"
    files.mkdir(exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for w in wheels:
        shutil.copy(w, files / w.name)
        projects.setdefault(w.name.split("-")[0].replace("_", "-"), []).append(w)
    for project, ws in projects.items():
        page = root / index / project
        page.mkdir(parents=True)
        links = "".join(f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                        f"{w.name}</a>\n" for w in ws)
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    site = tmp_path / "site"
    site.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.integration
def test_lock_against_a_local_torch_variant_index(tmp_path: Path, served: tuple[Path, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    require(have_uv(), "uv is not installed (pip install 'samebox[lock]')")
    site, url = served
    build = tmp_path / "build"
    build.mkdir()
    simple_index(site, "torch-cu118", [wheel(build, "torch", "2.3.0+cu118", [])])
    simple_index(site, "simple", [
        wheel(build, "trainlib", "1.0", ["torch", 'torch>=2.0; extra == "torch"'], ["torch"]),
        wheel(build, "trainlib", "2.0", ["torch", 'torch>=2.6; extra == "torch"', 'torch==1.0; extra == "bench"'],
              ["torch", "bench"]),
    ])
    monkeypatch.setenv("UV_DEFAULT_INDEX", f"{url}/simple")
    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    (root / "images" / "matrix.toml").write_text(ENTRY.format(index=f"{url}/torch-cu118"))
    (root / "images" / "requirements.in").write_text("trainlib\n")
    spec = load_catalog(root)[0]

    with pytest.raises(SameboxError) as err:  # trainlib 2.0 says torch>=2.6 in its runtime extra
        lock.lock_image(spec)
    assert "trainlib 2.0 declares torch>=2.6 (extra 'torch'), but this image has torch 2.3.0" in str(err.value)
    assert "bench" not in str(err.value) and not spec.lockfile.exists()

    (root / "images" / "constraints").mkdir()
    lock.constraints_file(spec).write_text("trainlib<2\n")
    result = lock.lock_image(spec)
    assert (result.torch, result.packages) == ("2.3.0+cu118", 2)
    text = spec.lockfile.read_text()
    assert f"torch 2.3.0+cu118 from {url}/torch-cu118" in text
    assert "-c images/constraints/t23.txt" in text and "-c samebox-torch-pin" in text
    assert str(tmp_path) not in text.split("inputs-sha256")[1]  # annotations name no temp paths
    assert lock.read_lock(spec.lockfile) == {"torch": "2.3.0+cu118", "trainlib": "1.0"}
    assert lock.check_lock(spec).state == "fresh"


def test_metadata_reader_json_and_html(served: tuple[Path, str], tmp_path: Path) -> None:
    site, url = served
    w = wheel(tmp_path, "trainlib", "1.0", ['torch>=2.0; extra == "torch"'], ["torch"])
    simple_index(site, "simple", [w])
    sha = hashlib.sha256(w.read_bytes()).hexdigest()
    assert pyindex.simple_files(f"{url}/simple", "trainlib") == {sha: f"{url}/files/{w.name}"}
    (site / "files" / f"{w.name}.metadata").write_text("Name: trainlib\nVersion: 1.0\nRequires-Dist: torch<2\n")
    assert "torch<2" in pyindex.wheel_metadata([f"{url}/simple"], "trainlib", {sha})  # PEP 658 file first
    (site / "files" / f"{w.name}.metadata").unlink()
    assert 'torch>=2.0; extra == "torch"' in pyindex.wheel_metadata([f"{url}/simple"], "trainlib", {sha})
    assert pyindex.wheel_metadata([f"{url}/simple"], "trainlib", {"f" * 64}) is None
    assert pyindex.reachable(f"{url}/simple") and pyindex.reachable(f"{url}/nothing-here")


def test_declared_torch_requirements_only_count_runtime_extras() -> None:
    meta = "\n".join([
        "Name: lib", "Version: 1", "Provides-Extra: torch", "Provides-Extra: benchmarks",
        "Requires-Dist: torch>=1.13",
        'Requires-Dist: torch>=2.6; extra == "torch"',
        'Requires-Dist: torch==2.0.1; extra == "benchmarks"',
        'Requires-Dist: torch>=9; python_version < "3.8"',
        'Requires-Dist: torch<2; sys_platform == "darwin"',
        "Requires-Dist: numpy",
    ])
    assert torchbounds.declared_torch_requirements(meta, "3.12") == [(">=1.13", ""), (">=2.6", "torch")]
    locked = {"lib": ("1", {"a" * 64}), "other": ("2", {"b" * 64})}
    problems, unchecked = torchbounds.torch_bound_problems(
        "2.3.0", "3.12", locked, lambda name, hashes: meta if name == "lib" else None)
    assert problems == ["lib 1 declares torch>=2.6 (extra 'torch'), but this image has torch 2.3.0: "
                        "pin an older lib in the image's constraints file"]
    assert unchecked == ["other==2"]


@pytest.mark.integration
@pytest.mark.network
def test_lock_test_catalog_from_pypi(tmp_path: Path) -> None:
    """One real resolution against PyPI (or the configured mirror): the test catalog relocks to the same pins."""
    require(have_uv(), "uv is not installed (pip install 'samebox[lock]')")
    require(pyindex.reachable(pyindex.default_index()), f"{pyindex.default_index()} is not reachable")
    root = tmp_path / "catalog"
    shutil.copytree(TEST_ROOT, root)
    spec = load_catalog(root)[0]
    committed = lock.parse_lock((TEST_ROOT / "lockfiles" / f"{spec.id}.txt").read_text())
    result = lock.lock_image(spec)
    assert result.packages == len(committed) and result.torch == "none"
    assert lock.check_lock(spec).state == "fresh"
    relocked = lock.parse_lock(spec.lockfile.read_text())
    assert [(p.name, p.version, p.hashes) for p in relocked] == [(p.name, p.version, p.hashes) for p in committed]
