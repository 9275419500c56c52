"""Files users hand us and files we write: text read as UTF-8 with a clear error, writes atomic (a temp file in
the same directory, fsync, rename: a half-written file never exists), and a directory proven writable up front.

A path the user gave that cannot be read or written is a user mistake (SameboxError, exit 2), not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from builder.core.errors import SameboxError
from builder.core.settings import AUTODL_DATA_DISK


def read_text(path: Path, what: str, hint: str) -> str:
    """A text file's content as UTF-8; a missing, unreadable or non-UTF-8 file is a SameboxError naming ``what``
    and, in ``hint``, what would work."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SameboxError(f"cannot read {what} {path}: {e.strerror or e}", hint) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SameboxError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start}: {e.reason})",
                           hint) from None


def _unwritable(path: Path, e: OSError) -> SameboxError:
    why = e.strerror or str(e)
    return SameboxError(f"cannot write {path}: {why}",
                        "give a file path in an existing, writable directory (not a directory or a path under a file)")


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        raise _unwritable(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_remembered(path: Path) -> dict:
    """A JSON object samebox remembered (a cache: findings, a probe's answer); {} where it is missing, unreadable
    or not an object: then the work is done again."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(path: Path, data: dict) -> bool:
    """Write a cache atomically, best effort, and only into a directory that exists (a check or a probe never makes
    samebox's state directory: a refused run leaves nothing behind). False when it could not be written (a read-only
    home, a full disk): that only costs the next run time."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)  # findings, no secrets: readable by the other users of a region-shared cache
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
        return False


@contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temp path beside ``path`` to write to (by any library); on success it is fsynced, given ``mode`` (the temp
    file is made 0600) and renamed onto ``path``, on error removed. For writers that want a file name, not bytes
    (torch.save, safetensors)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError as e:
            raise _unwritable(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (parents included) and prove a file can be made in it, before any long work depends on it;
    else a SameboxError naming ``what`` (a config field, a flag)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".samebox-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SameboxError(f"{what}={path} is not a writable directory: {e.strerror or e}",
                           f"point {what} at a directory you can write (on AutoDL: under {AUTODL_DATA_DISK})") from None
    return path


def readable_files(directory: Path, mode: int = 0o644) -> None:
    """The files a library wrote into ``directory`` get ``mode``, as samebox's own writers give theirs: some
    (safetensors) make theirs 0600, beside 0644 files of the same output."""
    for item in Path(directory).iterdir():
        if item.is_file() and not item.is_symlink():
            item.chmod(mode)


def check_creatable(path: Path, what: str) -> Path:
    """That ``path`` can be made later (its nearest existing parent is a directory that takes a new entry), proven
    now and creating nothing: for work that writes its output only after minutes of loading."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in path.parents if p.exists())
    hint = "give a path in a directory you can write (not under a file, not on a read-only disk)"
    if not existing.is_dir():
        raise SameboxError(f"{what} {path}: {existing} is a file, not a directory", hint)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".samebox-write-test-", dir=existing))
    except OSError as e:
        raise SameboxError(f"{what} {path}: cannot write in {existing}: {e.strerror or e}", hint) from None
    return path


@contextmanager
def pruned_if_left_empty(path: Path) -> Iterator[None]:
    """Around work that creates ``path`` (and its missing parents) for its output: each directory it created goes
    again when the work ends with no file under it, so a run that failed its checks leaves nothing behind."""
    path = Path(path).expanduser().absolute()
    missing = []  # deepest first
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        yield
    finally:
        for directory in missing:
            if not directory.is_dir():
                continue
            inside = list(directory.rglob("*"))
            if any(not p.is_dir() or p.is_symlink() for p in inside):
                break  # it holds a file: it stays, and so do its parents
            with suppress(OSError):  # something put a file there meanwhile (another rank): it stays
                for empty in sorted(inside, reverse=True):  # children before their parents
                    empty.rmdir()
                directory.rmdir()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
