"""Pin base images by digest: ask the registry (Docker Registry HTTP API v2) for the manifest digest of each
catalog entry's base tag and write it into images/matrix.toml's base_digest, in place and atomically.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from builder.core.errors import SameboxError
from builder.core.fsutil import write_atomic

DOCKER_HUB = "registry-1.docker.io"
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def parse_reference(ref: str) -> tuple[str, str, str]:
    """'nvidia/cuda:12.1.1-devel' -> ('registry-1.docker.io', 'nvidia/cuda', '12.1.1-devel')."""
    name, _, tag = ref.split("@")[0].rpartition(":")
    if not name or "/" in tag:
        name, tag = ref.split("@")[0], "latest"
    first = name.split("/")[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, name.split("/", 1)[1]
    else:
        registry, repo = DOCKER_HUB, name if "/" in name else f"library/{name}"
    return registry, repo, tag


def _scheme(registry: str) -> str:
    host = registry.split(":")[0]
    return "http" if host in ("localhost", "127.0.0.1") else "https"


def _bearer_token(challenge: str) -> str | None:
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in fields:
        return None
    query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
    with urllib.request.urlopen(f"{fields['realm']}?{query}", timeout=30) as resp:
        body = json.load(resp)
    return body.get("token") or body.get("access_token")


def fetch_digest(ref: str) -> str:
    """The registry's content digest for a tag (the multi-arch index when there is one)."""
    registry, repo, tag = parse_reference(ref)
    url = f"{_scheme(registry)}://{registry}/v2/{repo}/manifests/{tag}"
    headers = {"Accept": MANIFEST_TYPES}
    for _ in range(2):
        req = urllib.request.Request(url, method="HEAD", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                digest = resp.headers.get("Docker-Content-Digest", "")
                if not re.match(r"^sha256:[0-9a-f]{64}$", digest):
                    raise SameboxError(f"{registry} sent no content digest for {ref}")
                return digest
        except urllib.error.HTTPError as e:
            token = _bearer_token(e.headers.get("WWW-Authenticate", "")) if e.code == 401 else None
            if not token:
                raise SameboxError(f"{registry} answered {e.code} for {ref}", "check the tag exists") from e
            headers["Authorization"] = f"Bearer {token}"
        except (urllib.error.URLError, OSError) as e:
            raise SameboxError(
                f"cannot reach registry {registry} for {ref}: {getattr(e, 'reason', e)}",
                "pin-bases needs the registry; until then builds use the tag unpinned",
            ) from e
    raise SameboxError(f"{registry} refused the token it issued for {ref}")


def set_base_digest(matrix: Path, image_id: str, digest: str) -> None:
    """Rewrite one entry's base_digest line, keeping every comment and the order of the file."""
    text = matrix.read_text()
    blocks = re.split(r"(?m)^(?=\[\[)", text)
    for i, block in enumerate(blocks):
        if block.startswith("[[image]]") and re.search(rf'(?m)^id = "{re.escape(image_id)}"$', block):
            if not re.search(r"(?m)^base_digest = ", block):
                raise SameboxError(f"image {image_id!r} in {matrix} has no base_digest line", "add base_digest = \"\"")
            blocks[i] = re.sub(r'(?m)^base_digest = ".*"$', f'base_digest = "{digest}"', block)
            write_atomic(matrix, "".join(blocks))
            return
    raise SameboxError(f"no image {image_id!r} in {matrix}")
