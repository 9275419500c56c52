"""pin-bases against a local stand-in registry (token auth like Docker Hub), and the in-place matrix edit."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from builder.cli import main
from builder.core.spec import load_catalog
from builder.image.pin import parse_reference

REPO = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32


class _Registry(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # the token endpoint
        body = json.dumps({"token": "t0k"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        if self.headers.get("Authorization") != "Bearer t0k":
            self.send_response(401)
            realm = f"http://127.0.0.1:{self.server.server_port}/token"
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="reg",scope="repository:x:pull"')
            self.end_headers()
            return
        known = self.path.endswith("/manifests/12.1.1-cudnn8-devel-ubuntu22.04")
        self.send_response(200 if known else 404)
        if known:
            self.send_header("Docker-Content-Digest", DIGEST)
        self.end_headers()


@pytest.fixture
def registry():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_parse_reference() -> None:
    assert parse_reference("nvidia/cuda:12.1.1-devel") == ("registry-1.docker.io", "nvidia/cuda", "12.1.1-devel")
    assert parse_reference("python") == ("registry-1.docker.io", "library/python", "latest")
    assert parse_reference("localhost:5000/a/b:1") == ("localhost:5000", "a/b", "1")


def test_pin_bases_writes_digest_in_place(tmp_path: Path, registry: str, capsys) -> None:
    root = tmp_path / "cat"
    (root / "images").mkdir(parents=True)
    text = (REPO / "images" / "matrix.toml").read_text().replace("nvidia/cuda:", f"{registry}/nvidia/cuda:")
    (root / "images" / "matrix.toml").write_text(text)
    assert main(["pin-bases", "--root", str(root), "--image", "torch2.3-cu121-py312"]) == 0
    after = (root / "images" / "matrix.toml").read_text()
    assert after.count(DIGEST) == 1 and after.startswith("# samebox catalog")
    spec = next(s for s in load_catalog(root) if s.id == "torch2.3-cu121-py312")
    assert spec.base_ref == f"{registry}/nvidia/cuda:12.1.1-cudnn8-devel-ubuntu22.04@{DIGEST}"
    # An unknown tag is an error, and the file is left as it was.
    assert main(["pin-bases", "--root", str(root), "--image", "torch2.5-cu124-py312"]) == 2
    assert (root / "images" / "matrix.toml").read_text() == after
    assert "404" in capsys.readouterr().err


def test_unreachable_registry_is_a_clear_error(tmp_path: Path, capsys) -> None:
    root = tmp_path / "cat"
    shutil.copytree(REPO / "images", root / "images")
    text = (root / "images" / "matrix.toml").read_text().replace("nvidia/cuda:", "127.0.0.1:9/nvidia/cuda:")
    (root / "images" / "matrix.toml").write_text(text)
    assert main(["pin-bases", "--root", str(root), "--image", "torch2.3-cu121-py312"]) == 2
    assert "cannot reach registry" in capsys.readouterr().err
