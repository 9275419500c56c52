#!/usr/bin/env bash
# The GPU machine as a fresh instance of the torch2.11-cu130-py312 platform: run setup.sh offline from a carried
# wheelhouse, time start -> "selftest passed", run it again (idempotence), and record both with the fingerprint in
# $OUT/bootstrap_gpu.json (and the full log in $OUT/bootstrap_gpu.log).
#
# Carried (prepared on a machine with PyPI):
#   .whl/part-*/    the lock's wheels minus torch/triton/nvidia-*, split under 64 MiB per carry
#                   (bash bench/wheelhouse.sh lockfiles/torch2.11-cu130-py312.txt .whl/wheelhouse 3.12 60)
#   .whl/uv         optional: the uv binary (faster installs)
#   .whl/wheel-cache/  optional: a samebox wheel cache holding the flash-attn wheel (else --no-flash-attn)
# Usage: OUT=/some/dir bash bench/bootstrap_gpu.sh [--python /opt/torch/.venv/bin/python3]
# SETUP_EXTRA adds setup.sh options (a dry run off the GPU machine: SETUP_EXTRA='--root tests/fixtures/catalog').
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:?set OUT to the results directory}
py=/opt/torch/.venv/bin/python3
if [ "${1:-}" = --python ]; then py=${2:?--python needs a path}; fi
mkdir -p "$out"
work=$(mktemp -d /tmp/samebox-bootstrap.XXXXXX)
wheelhouse=$work/wheelhouse
mkdir -p "$wheelhouse" "$work/home"
found=0
for part in .whl/part-* .whl/wheelhouse; do
    [ -d "$part" ] || continue
    for whl in "$part"/*.whl; do ln -sf "$(pwd)/$whl" "$wheelhouse/"; found=$((found + 1)); done
done
[ "$found" -gt 0 ] || { echo "no wheels under .whl/part-* or .whl/wheelhouse" >&2; exit 2; }
extra=()
if [ -x .whl/uv ]; then mkdir -p "$work/bin" && cp .whl/uv "$work/bin/uv" && export PATH=$work/bin:$PATH; fi
if [ -f .whl/wheel-cache/manifest.json ]; then
    cp -r .whl/wheel-cache "$work/wheel-cache" && export SAMEBOX_WHEEL_CACHE=$work/wheel-cache
    extra+=(--flash-attn-profile "${FA_PROFILE:-slim}")
else
    extra+=(--no-flash-attn)
fi
export HOME=$work/home SAMEBOX_STATE=$work/home/.samebox

run_timed() {  # run_timed LOG: setup.sh with a timestamp on every line
    local start
    start=$(date +%s%N)
    set +e
    bash setup.sh --python "$py" --offline --wheelhouse "$wheelhouse" --cache-dir "$work/cache" \
        ${extra[@]+"${extra[@]}"} ${SETUP_EXTRA:-} 2>&1 | while IFS= read -r line; do
            ms=$(( ($(date +%s%N) - start) / 1000000 ))
            printf '%d.%03d %s\n' $((ms / 1000)) $((ms % 1000)) "$line"
        done > "$1"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}
rc1=0; run_timed "$work/first.log" || rc1=$?
rc2=0; run_timed "$work/second.log" || rc2=$?
{ echo "### first run (exit $rc1)"; cat "$work/first.log"; echo "### second run (exit $rc2)"; cat "$work/second.log"; } \
    > "$out/bootstrap_gpu.log"
"$py" - "$work" "$rc1" "$rc2" "$found" "${extra[*]:-}" > "$out/bootstrap_gpu.json" <<'EOF'
import json, sys
from pathlib import Path
work, rc1, rc2, wheels, extra = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def lines(name):
    return [(float(t), text) for t, _, text in (l.partition(" ") for l in (work / name).read_text().splitlines())]

def at(log, text):
    return next((t for t, line in log if line.startswith(text)), None)

first, second = lines("first.log"), lines("second.log")
fp = work / "home" / ".samebox" / "fingerprint.json"
steps = {line.split("] ", 1)[1]: t for t, line in first if line.startswith("==> [")}
json.dump({
    "platform": "torch2.11-cu130-py312 (the GPU machine's /opt/torch/.venv, torch 2.11.0+cu130)",
    "wheelhouse_wheels": wheels,
    "options": extra or "flash-attn from the carried wheel cache",
    "first_run": {"exit": rc1, "seconds_to_selftest_passed": at(first, "selftest passed"),
                  "seconds_total": first[-1][0] if first else None, "step_started_at": steps},
    "second_run": {"exit": rc2, "seconds_total": second[-1][0] if second else None,
                   "changed_nothing": not any(m in l for _, l in second
                                               for m in ("(re)installed ", "installed samebox from", "Installing"))},
    "fingerprint": json.loads(fp.read_text()) if fp.is_file() else None,
}, sys.stdout, indent=2, sort_keys=True)
EOF
echo "first run exit $rc1, second run exit $rc2; results in $out/bootstrap_gpu.json"
tail -n 12 "$work/first.log"
rm -rf "$work"
