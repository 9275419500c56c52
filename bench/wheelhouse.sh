#!/usr/bin/env bash
# Prepare an offline wheelhouse for `setup.sh --offline --wheelhouse DIR`: every package of a lockfile except the
# platform's own torch/triton/nvidia-* (an instance never installs those), hash-checked against the lock, plus a
# setuptools wheel (samebox's build backend, for interpreters without setuptools >= 70.1). Run on any machine with
# PyPI (or a mirror in pip.conf / PIP_INDEX_URL); the target Python and platform are given, not this machine's.
#   bash bench/wheelhouse.sh LOCKFILE DEST [PYTHON_VERSION [PART_MIB]]
#   bash bench/wheelhouse.sh lockfiles/torch2.11-cu130-py312.txt .whl/wheelhouse 3.12 60
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
PYTHONPATH="$here" "$py" -c '
import sys
from pathlib import Path
from builder.instance import drift
sys.stdout.write("".join(p.block + "\n" for p in drift.read_pins(Path(sys.argv[1])) if not p.platform_provided))
' "$lock" > "$req"
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
    n=0
    used=$((part_mib * 1048576))
    # Largest first, each into a new part when it does not fit the current one.
    while read -r size whl; do
        if [ $((used + size)) -gt $((part_mib * 1048576)) ]; then n=$((n + 1)); used=0; mkdir -p "$parent/part-$n"; fi
        mv "$whl" "$parent/part-$n/"
        used=$((used + size))
    done < <(find "$dest" -maxdepth 1 -name '*.whl' -printf '%s %p\n' | sort -rn)
    rmdir "$dest"
    du -sh "$parent"/part-*
fi
