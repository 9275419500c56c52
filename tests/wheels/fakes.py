"""Stand-ins for the flash-attn world: a tiny sdist whose setup.py behaves like ninja (progress lines, objects kept
between runs, a wheel in dist/), fake nvcc/ninja/cuobjdump, release wheels, and a local HTTP release host."""

from __future__ import annotations

import hashlib
import http.server
import io
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.core import compat

VERSION = "9.9.9"
PY = f"cp{sys.version_info.major}{sys.version_info.minor}"
PYDOT = f"{sys.version_info.major}.{sys.version_info.minor}"
EXT = f"flash_attn_2_cuda.cpython-{sys.version_info.major}{sys.version_info.minor}-x86_64-linux-gnu.so"

# The fake extension's bytes are its arch list ("80;90"); the fake cuobjdump prints one cubin per entry.
FAKE_SETUP = r'''
import json, os, sys, time, zipfile
from pathlib import Path
objects = int(os.environ.get("FAKE_OBJECTS", "3"))
tmp = Path("build/temp.fake"); tmp.mkdir(parents=True, exist_ok=True)
todo = [i for i in range(objects) if not (tmp / f"obj{i}.o").exists()]
with open(os.environ["FAKE_BUILD_COUNT"], "a") as fh:
    fh.write(f"{os.getpid()} {len(todo)}\n")
fail_after = int(os.environ.get("FAKE_FAIL_AFTER", "-1"))
for n, i in enumerate(todo, 1):
    if n - 1 == fail_after:
        print("nvcc: killed", flush=True); sys.exit(137)
    time.sleep(float(os.environ.get("FAKE_OBJECT_SECONDS", "0")))
    print(f"[{n}/{len(todo)}] nvcc obj{i}.cu", flush=True)
    (tmp / f"obj{i}.o").write_text("o")
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
version = "9.9.9+" + os.environ["FLASH_ATTN_LOCAL_VERSION"]
dist = Path(sys.argv[sys.argv.index("--dist-dir") + 1]); dist.mkdir(exist_ok=True)
with zipfile.ZipFile(dist / f"flash_attn-{version}-{py}-{py}-linux_x86_64.whl", "w") as zf:
    zf.writestr(f"flash_attn_2_cuda.cpython-{py[2:]}-x86_64-linux-gnu.so", os.environ["FLASH_ATTN_CUDA_ARCHS"])
    zf.writestr("flash_attn/__init__.py", "")
    zf.writestr("flash_attn/build_env.json", json.dumps({k: os.environ.get(k) for k in (
        "CPPFLAGS", "NVCC_APPEND_FLAGS", "MAX_JOBS", "NVCC_THREADS", "FLASH_ATTN_CUDA_ARCHS")}))
    zf.writestr(f"flash_attn-{version}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {py}-{py}-linux_x86_64\n")
    zf.writestr(f"flash_attn-{version}.dist-info/METADATA", f"Name: flash_attn\nVersion: {version}\n")
print("built", flush=True)
'''

FAKE_CUOBJDUMP = r'''#!/bin/sh
# --list-elf FILE: one line per arch written in the fake extension
tr ';' '\n' < "$2" | awk 'NF {printf "ELF file    %d: flash_attn_2_cuda.%d.sm_%s.cubin\n", NR, NR, $1}'
'''


def make_sdist(dest_dir: Path, setup_py: str = FAKE_SETUP) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"flash_attn-{VERSION}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = setup_py.encode()
        info = tarfile.TarInfo(f"flash_attn-{VERSION}/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_release(sdist_sha: str, sdist_url: str, **over: object) -> compat.FlashAttnRelease:
    fields = dict(sdist_sha256=sdist_sha, sdist_url=sdist_url, wheel_cuda=("13",), torch=("2.11",),
                  python=(PYDOT,), release_archs=("8.0", "9.0"), arch_env=True, objects=3)
    fields.update(over)
    return compat.FlashAttnRelease(**fields)  # type: ignore[arg-type]


def make_toolchain(bin_dir: Path, nvcc_release: str = "13.0") -> Path:
    """CUDA_HOME-like dir with bin/nvcc, bin/cuobjdump and bin/ninja that answer like the real ones."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "nvcc": f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.88'\n",
        "cuobjdump": FAKE_CUOBJDUMP,
        "ninja": "#!/bin/sh\necho 1.11.1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir.parent


def make_wheel(path: Path, archs: str = "80;90", py: str = PY, version: str = VERSION) -> Path:
    """A release-style wheel: fake extension (its arch list), .dist-info WHEEL + METADATA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"flash_attn_2_cuda.cpython-{py[2:]}-x86_64-linux-gnu.so", archs)
        zf.writestr("flash_attn/__init__.py", "")
        zf.writestr(f"flash_attn-{version}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {py}-{py}-linux_x86_64\n")
        zf.writestr(f"flash_attn-{version}.dist-info/METADATA", f"Name: flash_attn\nVersion: {version}\n")
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1; yields the base URL. Requests are counted in root/../requests.log."""
    log = root.parent / "requests.log"

    class Handler(_Quiet):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(root), **k)  # type: ignore[arg-type]

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with open(log, "a") as fh:
                fh.write(self.path + "\n")
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
