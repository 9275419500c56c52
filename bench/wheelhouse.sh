#!/usr/bin/env bash
# Prepare an offline wheelhouse for `setup.sh --offline --wheelhouse DIR`: every package of a lockfile except the
# platform's own torch/triton/nvidia-* (an instance never installs those), hash-checked against the lock, plus a
# setuptools wheel (samebox's build backend, for interpreters without setuptools >= 70.1). Run on any machine with
# PyPI (or a mirror in pip.conf / PIP_INDEX_URL); the target Python and platform are given, not this machine's.
#   bash bench/wheelhouse.sh LOCKFILE DEST [PYTHON_VERSION [PART_MIB]]
#   bash bench/wheelhouse.sh lockfiles/torch2.11-cu130-py312.txt .whl/wheelhouse 3.12 60
#   ONLY=bench/first_step_wheels.txt bash bench/wheelhouse.sh lockfiles/torch2.11-cu130-py312.txt .whl/wheelhouse 3.12 58
# PART_MIB splits the wheels into DEST's siblings part-1, part-2, ... of at most that size each (the GPU machine
# takes 64 MiB per carry; bench/bootstrap_gpu.sh joins them again).
set -euo pipefail
lock=${1:?usage: wheelhouse.sh LOCKFILE DEST [PYTHON_VERSION]}
dest=${2:?usage: wheelhouse.sh LOCKFILE DEST [PYTHON_VERSION]}
pyver=${3:-3.12}
part_mib=${4:-}
py=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req=$(mktemp)
trap 'rm -f "$req"' EXIT
# ONLY=FILE: just these packages (one canonical name a line, '#' comments): what a platform lacks or has at other
# versions, e.g. bench/first_step_wheels.txt for the GPU machine.
PYTHONPATH="$here" "$py" -c '
import sys
from pathlib import Path
from builder.instance import drift
only = None
if sys.argv[2]:
    only = {line.split("#")[0].strip() for line in Path(sys.argv[2]).read_text().splitlines()} - {""}
pins = [p for p in drift.read_pins(Path(sys.argv[1])) if not p.platform_provided and (only is None or p.name in only)]
missing = sorted((only or set()) - {p.name for p in pins})
if missing:
    sys.exit(f"wheelhouse: {sys.argv[2]} names packages {sys.argv[1]} does not lock: {missing}")
sys.stdout.write("".join(p.block + "\n" for p in pins))
' "$lock" "${ONLY:-}" > "$req"
mkdir -p "$dest"
# pip does not widen --platform to older compatible tags: name every manylinux the lock's glibc 2.28 floor accepts.
target=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none
        --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)
for glibc in $(seq 5 28); do target+=(--platform "manylinux_2_${glibc}_x86_64"); done
"$py" -m pip download -q --disable-pip-version-check --no-deps --require-hashes "${target[@]}" -r "$req" -d "$dest"
"$py" -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" 'setuptools>=70.1' -d "$dest"
echo "wheelhouse $dest: $(find "$dest" -maxdepth 1 -name '*.whl' | wc -l) wheels for Python $pyver ($(du -sh "$dest" | cut -f1))"
if [ -n "$part_mib" ]; then
    parent=$(dirname "$dest")
    rm -rf "$parent"/part-*
    # Largest first, each into the first part it fits (a new part when none has room).
    "$py" - "$dest" "$parent" "$part_mib" <<'EOF2'
import shutil, sys
from pathlib import Path
dest, parent, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) << 20
parts: list[int] = []
for whl in sorted(dest.glob("*.whl"), key=lambda w: -w.stat().st_size):
    size = whl.stat().st_size
    k = next((i for i, used in enumerate(parts) if used + size <= cap), None)
    if k is None:
        parts.append(0)
        k = len(parts) - 1
    parts[k] += size
    (parent / f"part-{k + 1}").mkdir(exist_ok=True)
    shutil.move(str(whl), parent / f"part-{k + 1}" / whl.name)
EOF2
    rmdir "$dest"
    du -sh "$parent"/part-*
fi
