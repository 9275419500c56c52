"""The wheel cache: a flat directory of wheels (usable as pip's --find-links) plus manifest.json (key -> file,
sha256), one lock per key so that only one process builds it, and a build area keyed the same way.

Layout: <root>/*.whl, <root>/manifest.json, <root>/locks/<key id>.lock, <root>/build/<key id>/.
Every write is a temp file + rename; a wheel whose sha256 no longer matches the manifest is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core import settings
from builder.core.errors import SameboxError
from builder.core.fsutil import sha256_file, write_atomic
from builder.wheels.key import WheelKey

MANIFEST = "manifest.json"


def default_cache_dir(env: dict[str, str] | None = None, autodl_fs: Path | None = None) -> Path:
    """settings.wheel_cache: the one decision setup and `samebox wheel` share."""
    return settings.wheel_cache(env, shared_fs=autodl_fs)


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    sha256: str
    source: str  # "release" | "build"
    elf_archs: tuple[str, ...]  # what cuobjdump listed, ("8.0", "9.0"); empty when it was not available


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy a (large) file so that ``dest`` is either absent or complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class WheelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def build_dir(self, key: WheelKey) -> Path:
        return self.root / "build" / key.id

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"version": 1, "entries": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise SameboxError(f"{self.manifest_path} is not valid JSON: {e}",
                               "samebox writes it atomically, so something else wrote it; remove it") from e
        data.setdefault("entries", {})
        return data

    @contextlib.contextmanager
    def _flock(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        lock_path = self.root / "locks" / name
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def key_lock(self, key: WheelKey, on_wait: Callable[[], None] | None = None) -> contextlib.AbstractContextManager:
        """Held while one process fetches or builds ``key``; a second one waits, then finds the cache hit."""
        return self._flock(f"{key.id}.lock", on_wait)

    def lookup(self, key: WheelKey) -> CacheEntry | None:
        """The cached wheel for ``key``, sha256-checked; None when absent; SameboxError when tampered with."""
        entry = self.read_manifest()["entries"].get(key.id)
        if entry is None:
            return None
        path = self.root / entry["file"]
        if not path.is_file():
            return None
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise SameboxError(
                f"cached wheel {path} does not match the manifest: sha256 {actual[:16]}…, "
                f"recorded {entry['sha256'][:16]}… (changed or corrupted since it was cached); refused",
                f"remove it (rm {path}) and run the command again to fetch or rebuild it",
            )
        return CacheEntry(path, actual, entry.get("source", "?"), tuple(entry.get("elf_archs", ())))

    def add(self, key: WheelKey, wheel: Path, source: str, elf_archs: tuple[str, ...],
            extra: dict[str, Any] | None = None) -> CacheEntry:
        """Copy ``wheel`` in atomically and record it (read-modify-write of the manifest under its own lock)."""
        dest = self.root / wheel.name
        sha = sha256_file(wheel)
        if wheel.resolve() != dest.resolve():
            copy_atomic(wheel, dest)
        with self._flock(MANIFEST + ".lock"):
            data = self.read_manifest()
            data["entries"][key.id] = {
                "file": dest.name,
                "sha256": sha,
                "key": key.to_dict(),
                "source": source,
                "elf_archs": list(elf_archs),
                "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "by": f"samebox on Python {sys.version_info.major}.{sys.version_info.minor}",
                **(extra or {}),
            }
            write_atomic(self.manifest_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return CacheEntry(dest, sha, source, elf_archs)
