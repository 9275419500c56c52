"""Same lock, same image: the build date every build claims, the label that says whether the engine honoured it, and
the comparison of two builds that, where they differ, names the first layer that does and the files in it.

The build date is one fixed value, not one per lock. The lock already decides what goes into the image; a date that
moved with the lock would change the interpreter stage too (its layer would be rebuilt when only the lock changed),
and buildah and podman reuse a cached layer whatever --timestamp a later build passes, so two dates could meet in one
image. It is after 1980 because zip, hence a wheel, cannot hold an earlier time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from builder.core.errors import SameboxError
from builder.image.engine import BuildRequest, Engine, ImageInfo, Stamping

SOURCE_DATE_EPOCH = 1704067200  # 2024-01-01T00:00:00Z
REPRODUCIBLE_LABEL = "io.samebox.reproducible"
# How many differing files a report lists (the count of all of them is always given).
REPORT_FILES = 20


def build_args() -> dict[str, str]:
    """SOURCE_DATE_EPOCH as a build arg: the Dockerfile's stages read it, and BuildKit takes it as the build date."""
    return {"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}


def labels(stamping: Stamping) -> dict[str, str]:
    """The label that says whether this image can be rebuilt bit for bit from its lock, and how, or why not."""
    if stamping.missing:
        return {REPRODUCIBLE_LABEL: f"no: {stamping.missing}"}
    return {REPRODUCIBLE_LABEL: f"yes: SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}, {' '.join(stamping.args)}"}


def rebuild_request(req: BuildRequest) -> tuple[BuildRequest, BuildRequest]:
    """The two builds of a reproducibility check: both without the layer cache, the second under its own tag."""
    name = req.tag.rsplit("/", 1)[-1]
    second = f"{req.tag}-rebuild" if ":" in name else f"{req.tag}:rebuild"
    return replace(req, no_cache=True, push=False), replace(req, tag=second, no_cache=True, push=False)


@dataclass(frozen=True)
class FileDifference:
    path: str
    what: str  # "content", "only in the first", "mode 644 != 755", ...


@dataclass(frozen=True)
class Comparison:
    """Two images of one context. ``layer``: index of the first layer whose diff id differs (None when the layers
    agree); ``made_by``: the instruction that made it; ``files``: what differs inside it; ``config``: the config fields
    that differ when every layer agrees."""

    first: tuple[str, ImageInfo]
    second: tuple[str, ImageInfo]
    layer: int | None = None
    made_by: str = ""
    files: tuple[FileDifference, ...] = ()
    config: tuple[str, ...] = ()

    @property
    def same(self) -> bool:
        return self.first[1].id == self.second[1].id

    def report(self) -> str:
        (ref_a, a), (ref_b, b) = self.first, self.second
        if self.same:
            return f"reproducible: {ref_a} and {ref_b} are the same image, {a.id} ({len(a.layers)} layers)"
        lines = [f"NOT reproducible: {ref_a} is {a.id}, {ref_b} is {b.id}"]
        if self.layer is None:
            lines.append(f"every layer is the same; the image config differs in: {', '.join(self.config) or '?'}")
            return "\n".join(lines)
        lines.append(f"first differing layer: {self.layer + 1} of {max(len(a.layers), len(b.layers))}"
                     + (f", made by: {_short(self.made_by)}" if self.made_by else ""))
        lines.append(f"  {_at(a.layers, self.layer)} != {_at(b.layers, self.layer)}")
        times_only = self.files and all(d.what.startswith("mtime ") for d in self.files)
        lines.append(f"{len(self.files)} file(s) differ in it"
                     + (" by their time only: the engine did not stamp the build date" if times_only else "")
                     + (":" if self.files else ""))
        lines += [f"  {d.path}: {d.what}" for d in self.files[:REPORT_FILES]]
        if len(self.files) > REPORT_FILES:
            lines.append(f"  ... and {len(self.files) - REPORT_FILES} more")
        return "\n".join(lines)


def _short(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _at(layers: tuple[str, ...], index: int) -> str:
    return layers[index] if index < len(layers) else "(no such layer)"


def compare_images(engine: Engine, first: str, second: str, workdir: Path) -> Comparison:
    """Compare two local images by id and layer diff ids; where they differ, export both (docker-archive, in a
    temporary directory under ``workdir``, removed afterwards) and name the first differing layer and its files."""
    info = []
    for ref in (first, second):
        found = engine.image(ref)
        if found is None:
            raise SameboxError(f"{engine.name} has no image {ref}", f"build it first, or name one `{engine.name} "
                               "images` lists")
        info.append(found)
    a, b = info
    base = Comparison((first, a), (second, b))
    if base.same:
        return base
    layer = next((i for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=False)) if x != y), None)
    if layer is None and len(a.layers) != len(b.layers):
        layer = min(len(a.layers), len(b.layers))
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".samebox-compare-", dir=workdir))
    try:
        archives = [tmp / "first.tar", tmp / "second.tar"]
        for ref, archive in zip((first, second), archives, strict=True):
            engine.save(ref, archive)
        images = [_Archive(p) for p in archives]
        if layer is None:
            return replace(base, config=_config_differences(images[0].config, images[1].config))
        return replace(base, layer=layer, made_by=images[0].made_by(layer) or images[1].made_by(layer),
                       files=diff_layers(images[0].layer(layer), images[1].layer(layer)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Archive:
    """A docker-archive tar: manifest.json names the config and the layer tars, in diff-id order."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path)
        manifest = json.loads(self._read(self._member("manifest.json")))[0]
        self.layers: list[str] = manifest["Layers"]
        self.config: dict = json.loads(self._read(self._member(manifest["Config"])))

    def _member(self, name: str) -> tarfile.TarInfo:
        return self.tar.getmember(name)

    def _read(self, member: tarfile.TarInfo) -> bytes:
        f = self.tar.extractfile(member)
        assert f is not None, member.name
        return f.read()

    def made_by(self, index: int) -> str:
        """The history entry that made layer ``index`` (entries with empty_layer made none)."""
        made = [h.get("created_by") or h.get("comment") or "" for h in self.config.get("history") or []
                if not h.get("empty_layer")]
        offset = len(self.layers) - len(made)  # an imported base may have fewer history entries than layers
        return made[index - offset] if 0 <= index - offset < len(made) else ""

    def layer(self, index: int) -> dict[str, tuple]:
        if index >= len(self.layers):
            return {}
        f = self.tar.extractfile(self._member(self.layers[index]))
        assert f is not None
        return layer_members(f)


def layer_members(fileobj) -> dict[str, tuple]:
    """path -> (type, sha256 of the content or the link target, size, mode, uid, gid, mtime) for a layer tar read
    as a stream (plain or compressed)."""
    members: dict[str, tuple] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as layer:
        for m in layer:
            digest = m.linkname
            if m.isfile():
                digest = _sha256(layer.extractfile(m))
            name = m.name.removeprefix("./").rstrip("/") or "/"
            members[name] = (m.type, digest, m.size, m.mode, m.uid, m.gid, int(m.mtime))
    return members


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


_FIELDS = ("type", "content", "size", "mode", "uid", "gid", "mtime")


def diff_layers(a: dict[str, tuple], b: dict[str, tuple]) -> tuple[FileDifference, ...]:
    """Every path whose entry differs between two layers, in path order: missing on one side, its content, or the
    first metadata field that differs (both values shown)."""
    out = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            out.append(FileDifference(path, "only in the first"))
        elif path not in a:
            out.append(FileDifference(path, "only in the second"))
        elif a[path] != b[path]:
            if a[path][:3] != b[path][:3]:
                out.append(FileDifference(path, "content"))
                continue
            field = next(i for i, (x, y) in enumerate(zip(a[path], b[path], strict=True)) if x != y)
            shown = (oct if _FIELDS[field] == "mode" else str)
            out.append(FileDifference(path, f"{_FIELDS[field]} {shown(a[path][field])} != {shown(b[path][field])}"))
    return tuple(out)


def _config_differences(a: dict, b: dict) -> tuple[str, ...]:
    keys = sorted(a.keys() | b.keys())
    out = [k for k in keys if k != "config" and a.get(k) != b.get(k)]
    inner_a, inner_b = a.get("config") or {}, b.get("config") or {}
    out += [f"config.{k}" for k in sorted(inner_a.keys() | inner_b.keys()) if inner_a.get(k) != inner_b.get(k)]
    return tuple(out)
