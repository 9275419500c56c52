"""The model's weight files read into the page cache by background threads from the moment the command starts, so
the seconds a cold disk needs (a new or cloned instance, a restart after the page cache went) pass beside the data
checks, the imports and the preflight instead of inside the load. A file already in memory reads in a fraction of a
second; nothing is read when the weights would not fit in half of the memory available now, or under torchrun
but on the node's first process. The load itself reads the same files as it always did: this only warms them."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ModelConfig
from trainer.model.hub import cached_config, resolve_source

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
CHUNK = 16 << 20
SEGMENT = 256 << 20  # what one thread reads at a time
# Linux: sendfile() to /dev/null has the kernel read each segment into the page cache without copying it out (a
# thread copying 15 GB through Python buffers takes CPU and the interpreter lock from the imports it overlaps);
# posix_fadvise(WILLNEED) would not do: the kernel caps it at one readahead window per call. Elsewhere the threads read.
SENDFILE = sys.platform.startswith("linux") and hasattr(os, "sendfile")


def weight_files(cfg: ModelConfig) -> list[Path]:
    """The weight files of a local model directory, or of a hub model already in the local cache (its snapshot
    directory); [] for a model that is not on disk yet (the download reads it anyway)."""
    try:
        source, name = resolve_source(cfg)
    except Exception:  # noqa: BLE001  # a bad model.name is reported by the load, with its hint
        return []
    if source == "local":
        folder = Path(name).expanduser()
    elif source == "hub":
        config = cached_config(name, cfg.revision)
        if config is None:
            return []
        folder = Path(config).parent
    else:
        return []
    safetensors = sorted(folder.glob(WEIGHT_PATTERNS[0]))
    found = safetensors or sorted(folder.glob(WEIGHT_PATTERNS[1]))
    return [p for p in found if p.is_file()]


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
        """Each file in segments (one 15 GB shard is read by every thread, not one), in file order."""
        queue = [(path, offset, min(SEGMENT, size - offset))
                 for path, size in ((p, p.stat().st_size) for p in self.files)
                 for offset in range(0, size, SEGMENT)]
        began = time.monotonic()
        for _ in range(max(1, min(threads, len(queue)))):
            t = threading.Thread(target=self._read, args=(queue, began), name="samebox-prefetch", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)


def start_prefetch(cfg: ModelConfig, threads: int = 4, share: float = 0.5,
                   available: int | None = None) -> Prefetch | None:
    """Start reading ``cfg``'s weight files when they fit in ``share`` of the available memory; None when not."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return None  # one reader per node: the other processes find the pages the first one read
    files = weight_files(cfg)
    if not files:
        return None
    try:
        total = sum(p.stat().st_size for p in files)
    except OSError:
        return None
    room = available_bytes() if available is None else available
    if room is None or total > share * room:
        return None
    return Prefetch(files, total).start(threads)
