"""Files read into the page cache by background threads (Linux: sendfile() to /dev/null, so the kernel reads each
range without copying it out and without the interpreter lock; elsewhere the threads read), for the seconds a cold
disk costs (a new or cloned instance, a restart after the page cache went) to pass beside other work instead of
inside it. ``library_files`` lists the native libraries an import of torch and its kernels maps: an import faults
their pages in a few at a time, a reader streams them whole. Used by setup (before its self-test imports torch) and by
`samebox train` (trainer/model/prefetch.py: the libraries, then the model's weights)."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 16 << 20
SEGMENT = 256 << 20  # what one thread reads at a time
# Linux: sendfile() to /dev/null has the kernel read each segment into the page cache without copying it out (a
# thread copying 15 GB through Python buffers takes CPU and the interpreter lock from the imports it overlaps);
# posix_fadvise(WILLNEED) would not do: the kernel caps it at one readahead window per call. Elsewhere the threads read.
SENDFILE = sys.platform.startswith("linux") and hasattr(os, "sendfile")
# Where each package keeps the libraries an import maps, in the order a training command imports them (torch's first).
LIBRARY_GLOBS = (("torch", ("lib/*.so*",)), ("nvidia", ("*/lib/*.so*",)), ("triton", ("_C/*.so*",)),
                 ("bitsandbytes", ("*.so",)), ("flash_attn_2_cuda", ()))


def _roots(package: str) -> tuple[list[Path], Path | None]:
    """A package's directories (several for a namespace package such as nvidia), or a lone extension module's file,
    found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return [], None
    if spec is None:
        return [], None
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations], None
    origin = Path(spec.origin) if spec.origin else None
    return [], origin if origin is not None and ".so" in origin.name else None


def library_files(roots: dict[str, list[Path]] | None = None) -> list[Path]:
    """The native libraries of LIBRARY_GLOBS' packages (``roots``: each package's directories, else where Python
    would import it from), by package in import order, the largest first within one; each file once."""
    found: list[Path] = []
    for package, patterns in LIBRARY_GLOBS:
        if roots is not None:
            dirs, single = roots.get(package, []), None
        else:
            dirs, single = _roots(package)
        files = [single] if single is not None else []
        for folder in dirs:
            for pattern in patterns:
                files += [f for f in folder.glob(pattern) if f.is_file() and not f.is_symlink()]
        sizes = {}
        for f in files:
            try:
                sizes[f] = f.stat().st_size
            except OSError:
                continue
        found += sorted(sizes, key=lambda f: -sizes[f])
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]  # type: ignore[func-returns-value]


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable, or None where the system does not say (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Prefetch:
    """Background readers of some files; ``read_bytes`` grows as they go, ``stop()`` ends them early."""

    files: list[Path]
    total_bytes: int
    library_bytes: int = 0  # of total_bytes, the native libraries' (read first)
    read_bytes: int = 0
    seconds: float | None = None  # when the last reader finished
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self, queue: list[tuple[Path, int, int]], began: float) -> None:
        view: memoryview | None = None  # a buffer only where the kernel cannot read for us (no zeroed 16 MiB each)
        while not self._stop.is_set():
            with self._lock:
                if not queue:
                    break
                path, offset, length = queue.pop(0)
            try:
                with open(path, "rb", buffering=0) as fh:
                    left = length
                    if SENDFILE:  # the kernel reads the range into the page cache: no copy, the GIL left alone
                        left = self._send(fh.fileno(), offset, length)
                        offset += length - left
                    fh.seek(offset)
                    if left > 0 and view is None:
                        view = memoryview(bytearray(CHUNK))
                    while left > 0 and not self._stop.is_set():
                        n = fh.readinto(view[:min(CHUNK, left)])
                        if not n:
                            break
                        left -= n
                        with self._lock:
                            self.read_bytes += n
            except OSError:
                continue  # the load reports a file it cannot read
        with self._lock:
            self.seconds = round(time.monotonic() - began, 2)

    def _send(self, fd: int, offset: int, length: int) -> int:
        """sendfile() of the range to /dev/null; returns what is left (all of it where the kernel refuses)."""
        sink = os.open(os.devnull, os.O_WRONLY)
        try:
            while length > 0 and not self._stop.is_set():
                try:
                    n = os.sendfile(sink, fd, offset, min(length, CHUNK * 4))
                except OSError:
                    return length  # a filesystem without splice: the caller reads
                if not n:
                    break
                offset += n
                length -= n
                with self._lock:
                    self.read_bytes += n
        finally:
            os.close(sink)
        return length if not self._stop.is_set() else 0

    def start(self, threads: int) -> Prefetch:
        """Each file in segments (one 15 GB shard is read by every thread, not one), in file order; a file that is
        gone by now is left out (whoever needs it reports it)."""
        queue = []
        for path in self.files:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            queue += [(path, offset, min(SEGMENT, size - offset)) for offset in range(0, size, SEGMENT)]
        began = time.monotonic()
        for _ in range(max(1, min(threads, len(queue)))):
            t = threading.Thread(target=self._read, args=(queue, began), name="samebox-prefetch", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, wait: float = 0.0) -> None:
        """End the readers; with ``wait``, give them that many seconds to return (each finishes the chunk it is in),
        so ``read_bytes`` and ``seconds`` are final where they made it."""
        self._stop.set()
        self.join(wait)

    def join(self, timeout: float) -> Prefetch:
        """Wait up to ``timeout`` seconds for the readers to return (``done()`` says whether they did)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self

    @property
    def stopped(self) -> bool:
        """Whether stop() came before every file was read."""
        return self._stop.is_set() and self.read_bytes < self.total_bytes

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)


def sized(files: list[Path]) -> tuple[list[Path], int]:
    """``files`` and their bytes; ([], 0) where one cannot be read."""
    try:
        return files, sum(p.stat().st_size for p in files)
    except OSError:
        return [], 0


def start_libraries(threads: int = 4, share: float = 0.5, available: int | None = None,
                    libraries: list[Path] | None = None) -> Prefetch | None:
    """Start reading the native libraries (``libraries``, else library_files()) when they fit in ``share`` of the
    available memory; None when nothing is read."""
    room = available_bytes() if available is None else available
    libs, total = sized(library_files() if libraries is None else libraries)
    if room is None or not libs or total > share * room:
        return None
    return Prefetch(libs, total, total).start(threads)
