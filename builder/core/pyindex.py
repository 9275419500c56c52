"""The package index as the environment configures it: mirror URL, CA bundle, credentials kept out of output.

Used by the lock step twice: to hand uv the same mirror and CA that pip would use, and to read a locked wheel's
metadata (PEP 691/503 simple pages, PEP 658 ``.metadata`` files) for the torch-bound check.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser

from builder.core import settings

PYPI_SIMPLE = "https://pypi.org/simple"
# A wheel is downloaded whole only when its index serves no PEP 658 metadata file; past this size we give up.
_WHEEL_FALLBACK_LIMIT = 128 * 1024 * 1024
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@")
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def redact(text: str) -> str:
    """Drop the user:password part of every URL in ``text`` (for headers, annotations and error messages)."""
    return _USERINFO.sub(r"\1", text)


def default_index() -> str:
    """The index uv and pip would use: UV_DEFAULT_INDEX, UV_INDEX_URL, PIP_INDEX_URL, else PyPI."""
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(var):
            return os.environ[var].rstrip("/")
    return PYPI_SIMPLE


CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")


def ca_bundle() -> str | None:
    """The proxy/corporate CA bundle the environment names: $SAMEBOX_CA_BUNDLE, else the first of CA_ENV_VARS,
    that is a file."""
    for path in (settings.ca_bundle_override(), *(os.environ.get(var) for var in CA_ENV_VARS)):
        if path and os.path.isfile(path):
            return path
    return None


def uv_environment() -> dict[str, str]:
    """os.environ for a uv subprocess: PIP_INDEX_URL mapped to uv's own variable (uv does not read pip's), and
    the CA bundle passed as SSL_CERT_FILE, or the system store when none is named. URLs stay in the
    environment, never on a command line that could be logged."""
    env = dict(os.environ)
    # Resolving for a target Python needs no interpreter of that version; without this uv first tries to
    # download one (seconds of retries where GitHub is unreachable) before falling back to any interpreter.
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    if not (env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL")) and env.get("PIP_INDEX_URL"):
        env["UV_DEFAULT_INDEX"] = env["PIP_INDEX_URL"]
    ca = ca_bundle()
    if ca:
        env["SSL_CERT_FILE"] = ca
    else:
        # Newer uv spells it UV_SYSTEM_CERTS, older UV_NATIVE_TLS; each ignores the other.
        env["UV_SYSTEM_CERTS"] = "1"
        env["UV_NATIVE_TLS"] = "1"
    return env


def _request(url: str, accept: str | None = None) -> urllib.request.Request:
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "samebox-lock"}
    if accept:
        headers["Accept"] = accept
    if parts.username is not None:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
    return urllib.request.Request(url, headers=headers)


def http_get(url: str, accept: str | None = None, timeout: float = 30, attempts: int = 3) -> tuple[bytes, str]:
    """GET through the environment's proxy and CA; returns (body, content type). Transient failures (DNS, reset
    connections) are retried with a short backoff; an HTTP error answer is not. Raises OSError on failure."""
    context = ssl.create_default_context(cafile=ca_bundle())
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(_request(url, accept), timeout=timeout, context=context) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def reachable(index_url: str, timeout: float = 10) -> bool:
    """Whether an index answers at all (any HTTP status counts: a 404 still proves the host is there)."""
    try:
        http_get(index_url.rstrip("/") + "/", timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or None

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.hrefs.append((data.strip(), self._href))
            self._href = None


def simple_files(index_url: str, project: str) -> dict[str, str]:
    """sha256 -> absolute file URL for every file of ``project`` on a PEP 691 (JSON) or PEP 503 (HTML) index
    ({} when the index does not carry the project)."""
    page = f"{index_url.rstrip('/')}/{project}/"
    try:
        body, ctype = http_get(page, accept=f"{_SIMPLE_JSON}, text/html;q=0.1")
    except urllib.error.HTTPError as e:
        if e.code == 404:  # the index does not carry this project
            return {}
        raise
    files: dict[str, str] = {}
    if _SIMPLE_JSON in ctype:
        for f in json.loads(body)["files"]:
            if "sha256" in f.get("hashes", {}):
                files[f["hashes"]["sha256"]] = urllib.parse.urljoin(page, f["url"])
        return files
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    for _, href in parser.hrefs:
        url, _, frag = urllib.parse.urljoin(page, href).partition("#")
        if frag.startswith("sha256="):
            files[frag.removeprefix("sha256=")] = url
    return files


def wheel_metadata(index_urls: list[str], project: str, hashes: set[str]) -> str | None:
    """The METADATA text of one locked wheel of ``project`` (chosen by the lock's hashes), or None when no index
    holds a wheel with one of those hashes."""
    for index in index_urls:
        files = simple_files(index, project)
        wheels = sorted(url for sha, url in files.items() if sha in hashes and url.endswith(".whl"))
        if not wheels:
            continue
        try:
            return http_get(wheels[0] + ".metadata")[0].decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        return _metadata_from_wheel(wheels[0])
    return None


def _metadata_from_wheel(url: str) -> str | None:
    body, _ = http_get(url, timeout=120)
    if len(body) > _WHEEL_FALLBACK_LIMIT:
        return None
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        return zf.read(name).decode("utf-8", "replace") if name else None
