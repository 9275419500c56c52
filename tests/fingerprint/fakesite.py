"""Installed distributions made by hand in a temporary site directory: METADATA, files and a RECORD with real
hashes, as an installer leaves them."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def add_dist(site: Path, name: str, version: str, files: dict[str, str] | None = None, record: bool = True) -> Path:
    """Install a fake distribution ``name`` into ``site``; returns its dist-info directory."""
    files = files if files is not None else {f"{name}/__init__.py": f"VERSION = {version!r}\n"}
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    rows = []
    for rel, text in sorted(files.items()):
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        rows.append(f"{rel},{record_hash(text.encode())},{len(text)}")
    meta = (info / "METADATA").read_bytes()
    rows += [f"{info.name}/METADATA,{record_hash(meta)},{len(meta)}", f"{info.name}/INSTALLER,,",
             f"{info.name}/RECORD,,", f"../../../bin/{name},{record_hash(b'#!/x')},4"]
    if record:
        (info / "RECORD").write_text("\n".join(rows) + "\n")
    return info


def lock_line(name: str, version: str) -> str:
    return f"{name}=={version} \\\n    --hash=sha256:{'0' * 64}\n    # via -r requirements.in\n"
