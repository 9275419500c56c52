#!/usr/bin/env bash
# Download the unsloth wheel set for the GPU machine (no network there) into .whl/unsloth/ (git-ignored), from the
# list in bench/peers_wheels.txt: Python 3.12, manylinux x86_64 wheels, no dependency resolution (the list is the
# resolution, checked against each wheel's Requires-Dist and the GPU machine's packages).
#
#   bash bench/peers_wheels.sh          # .whl/unsloth/, the full set, ~40 MB: too big to carry with .whl/base/
#                                       # (bitsandbytes 43 MB + flash-attn ~10 MB), so it needs a call of its own
#   bash bench/peers_wheels.sh --lean   # .whl/unsloth-lean/, ~10 MB: unsloth without its studio/ web app (only
#                                       # unsloth_cli uses it), no torchao; fits in one call with .whl/base/
set -euo pipefail
cd "$(dirname "$0")/.."
lean=false dest=.whl/unsloth
[ "${1:-}" = "--lean" ] && lean=true dest=.whl/unsloth-lean
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }

mapfile -t wanted < <(grep -v '^#' bench/peers_wheels.txt | grep . | { if $lean; then grep -v '# lean'; else cat; fi } \
                      | sed 's/ *#.*//')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${wanted[@]}"

# Keep exactly the listed versions (an older download would make two versions of one package: pip refuses both).
python3 - "$dest" "${wanted[@]}" <<'EOF'
import pathlib, re, sys
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
keep = {(norm(n), v) for n, v in (w.split("==") for w in sys.argv[2:])}
for whl in pathlib.Path(sys.argv[1]).glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    if (norm(name), version) not in keep:
        print(f"removing {whl} (not in the list)")
        whl.unlink()
EOF

if $lean; then
    # Rebuild the unsloth wheel without studio/ (its web UI, 82 MB unpacked) and its RECORD lines.
    python3 - "$dest"/unsloth-2026.10.9-py3-none-any.whl <<'EOF'
import sys, zipfile
src = sys.argv[1]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for item in zin.infolist():
        if item.filename.startswith("studio/"):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"studio/"))
        zout.writestr(item, data)
import os
os.replace(tmp, src)
EOF
fi
ls -la "$dest"
du -cb "$dest"/*.whl | tail -1 | awk '{printf "total %.1f MB in %s\n", $1 / 1e6, "'"$dest"'"}'
