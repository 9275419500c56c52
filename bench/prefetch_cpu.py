"""The trainer's read-ahead of the weights (builder/core/readahead.py, used by trainer/model/prefetch.py), its
mechanism measured on any Linux machine with root (the page cache is dropped before each arm): a file standing in for
the weights, a main thread doing CPU-bound Python work standing in for the imports, then a full read of the file
standing in for the load.

Arms, side by side in one run:
  none      no read-ahead: the load reads a cold file (what a start did before the read-ahead)
  fadvise   posix_fadvise(WILLNEED) over the whole file (what the GPU run of 20ce563 used: the kernel caps it at one
            readahead window per call)
  threads   four threads copying the file through Python buffers (the first version)
  sendfile  four threads, sendfile() of 256 MiB segments to /dev/null (the shipped one)
Reported per arm: the stand-in imports' seconds (the interpreter lock shared with the readers shows here), the load's
seconds, the page cache held after the read-ahead (fincore, where installed), and each total against `none`'s.

    sudo .venv/bin/python bench/prefetch_cpu.py [--gib 2] [--work-s 3] [--out bench/results/prefetch_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from header import header  # noqa: E402

from builder.core import readahead as prefetch  # noqa: E402

ARMS = ("none", "fadvise", "threads", "sendfile")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cached_bytes(path: Path) -> int | None:
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def busy(units: int) -> float:
    """CPU-bound Python (what imports mostly are): ``units`` fixed loops; returns their seconds."""
    began = time.monotonic()
    for _ in range(units):
        total = 0
        for i in range(100_000):
            total += i * i
    return time.monotonic() - began


def load(path: Path) -> float:
    began = time.monotonic()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(16 << 20)
        while fh.readinto(buf):
            pass
    return time.monotonic() - began


def arm(name: str, path: Path, units: int) -> dict:
    drop_caches()
    began = time.monotonic()
    warm = None
    if name == "fadvise":
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        os.close(fd)
    elif name in ("threads", "sendfile"):
        prefetch.SENDFILE = name == "sendfile"
        warm = prefetch.Prefetch([path], path.stat().st_size).start(threads=4)
    work_s = busy(units)
    resident = cached_bytes(path)
    load_s = load(path)
    if warm is not None:
        warm.stop()
    return {"work_s": round(work_s, 3), "cached_after_work_bytes": resident, "load_s": round(load_s, 3),
            "total_s": round(time.monotonic() - began, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="the stand-in weights' size")
    p.add_argument("--work-s", type=float, default=3.0, help="the stand-in imports' seconds, without read-ahead")
    p.add_argument("--dir", default=None, help="where the file goes (default: a temp dir on /var/tmp's disk)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prefetch_cpu.json"))
    opts = p.parse_args()
    if os.geteuid() != 0:
        print("prefetch_cpu: needs root to drop the page cache between arms (run it with sudo)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="samebox-prefetch.", dir=opts.dir or "/var/tmp"))
    try:
        path = folder / "model.safetensors"
        with open(path, "wb") as fh:
            block = os.urandom(16 << 20)
            for _ in range(int(opts.gib * 1024 / 16)):
                fh.write(block)
        calibrate = busy(5)
        units = max(1, int(opts.work_s / (calibrate / 5)))
        results = {name: arm(name, path, units) for name in ARMS}
        base = results["none"]["total_s"]
        for value in results.values():
            value["total_vs_none"] = round(value["total_s"] / base, 3)
        doc = {"header": header(" ".join(["python", *sys.argv])),
               "benchmark": __doc__.split("\n\n")[0].replace("\n", " "),
               "file_bytes": path.stat().st_size, "work_units": units, "arms": results}
        Path(opts.out).write_text(json.dumps(doc, indent=2) + "\n")
        for name, value in results.items():
            print(f"{name:9s} work {value['work_s']:.2f} s  load {value['load_s']:.2f} s  "
                  f"total {value['total_s']:.2f} s  ({value['total_vs_none']:.2f}x none)  "
                  f"cached after the work: {value['cached_after_work_bytes']}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
