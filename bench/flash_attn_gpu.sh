#!/usr/bin/env bash
# The whole flash-attn GPU run, with the project's own command, on a machine with torch+CUDA, nvcc and a GPU:
#   bash bench/flash_attn_gpu.sh            # slim sm_90 build, cache-hit install, numeric check, sm_80 refusal
#   PROFILE=full bash bench/flash_attn_gpu.sh   # same for the full profile (re-run to resume a killed build)
# Needs no network: the sdist (and setuptools/wheel/packaging wheels, if the Python lacks them) come from .whl/.
# Writes $OUT/flash_attn_build.json (command, machine, versions, seconds) and the wheel + logs under $OUT.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/.out/flash_attn}
PY=${PY:-python3}
PROFILE=${PROFILE:-slim}
ARCH=${ARCH:-9.0}
FA_VERSION=${FA_VERSION:-2.8.3}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-500}
CACHE=${CACHE:-$REPO/.out/fa-cache}   # under .out/: kept between runs on a warm machine, so a build resumes
SRC_DIR=${SRC_DIR:-.whl}               # where the sdist and the setuptools/wheel/packaging wheels are
NVCC_TIME=${NVCC_TIME:-}               # 1: nvcc --time, each object's compile phases timed into $OUT/nvcc_time_$PROFILE.csv
WORK=$(mktemp -d)
mkdir -p "$OUT" "$CACHE"
export CACHE PATH="$PATH:/usr/local/cuda/bin"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)

# A venv that sees the machine's torch but takes our installs (the system Python may be externally managed).
VENV=$REPO/.out/fa-venv
VPY=$VENV/bin/python
if [ ! -x "$VPY" ]; then
  "$PY" -m venv --system-site-packages "$VENV" 2>/dev/null \
    || { rm -rf "$VENV"; "$PY" -m venv --without-pip --system-site-packages "$VENV"; }
fi
if ! "$VPY" -c "import torch, pip" 2>/dev/null; then
  # $PY is itself a venv (its packages are not "system" ones) or has no pip for the venv: use it directly,
  # this is a throwaway machine.
  VPY=$PY
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi
if ! "$VPY" -c "import setuptools, wheel, packaging" 2>/dev/null; then
  "$VPY" -m pip install -q --no-index --find-links "$SRC_DIR" setuptools wheel packaging 2>&1 | tail -2
fi
echo "python: $VPY ($("$VPY" -c 'import torch, setuptools; print("torch", torch.__version__, "setuptools", setuptools.__version__)'))"
SAMEBOX=("$VPY" -m builder wheel flash-attn --from-env --version "$FA_VERSION" --cache "$CACHE")
SDIST=$SRC_DIR/flash_attn-$FA_VERSION.tar.gz
if [ -n "$NVCC_TIME" ]; then
  # nvcc appends one CSV row per compile phase (cicc, ptxas, the host compiler, ...) of every object.
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }--time $OUT/nvcc_time_$PROFILE.csv"
fi

now() { date +%s.%N; }

echo "== build $PROFILE sm_${ARCH/./} (timeout ${BUILD_TIMEOUT}s)"
BUILD_CMD=("${SAMEBOX[@]}" --arch "$ARCH" --profile "$PROFILE" --offline --sdist "$SDIST" --dest "$OUT" --json)
t0=$(now)
touch "$WORK/started"
timeout "$BUILD_TIMEOUT" "${BUILD_CMD[@]}" >"$WORK/build.json" 2>"$OUT/build_$PROFILE.log"
build_rc=$?
t1=$(now)
grep -v '^\[' "$OUT/build_$PROFILE.log" | tail -25
grep -c '^samebox wheel: compiled' "$OUT/build_$PROFILE.log" | sed 's/^/progress lines: /'
# ninja's own record of each object's start and end (ms since the build started), for the schedule's analysis.
# This profile's build directory (the key id names it), and only a log this run wrote (not a cache hit's old one).
NINJA_LOG=$(find "$CACHE/build" -path "*-sm${ARCH/./}-$PROFILE-*/build/temp*" -name .ninja_log -newer "$WORK/started" \
            2>/dev/null | head -1)
if [ -n "$NINJA_LOG" ]; then
  cp "$NINJA_LOG" "$OUT/ninja_log_$PROFILE.txt"
  "$VPY" -m builder.wheels.schedule "$NINJA_LOG" || true
fi

# A '+' in a file name keeps it from coming back from some machines: keep a copy named without it.
for w in "$OUT"/flash_attn-*+*.whl; do [ -f "$w" ] && cp "$w" "$OUT/$(basename "$w" | tr + -)"; done

echo "== cache hit + install"
HIT_CMD=("${SAMEBOX[@]}" --arch "$ARCH" --profile "$PROFILE" --offline --install --json)
t2=$(now); hit_rc=-1
if [ "$build_rc" = 0 ]; then
  "${HIT_CMD[@]}" >"$WORK/hit.json" 2>"$WORK/hit.log"
  hit_rc=$?
  cat "$WORK/hit.log"
else
  echo "build did not finish (rc=$build_rc): run this script again to resume it"
fi
t3=$(now)

echo "== installed flash_attn: slim guard + numeric check"
"$VPY" - >"$WORK/installed.json" 2>"$WORK/installed.err" <<'EOF'
import json, torch, flash_attn
from flash_attn import flash_attn_varlen_func
lens = torch.tensor([0, 50, 150], device="cuda", dtype=torch.int32)
q = torch.randn(150, 4, 64, device="cuda", dtype=torch.bfloat16)
try:
    flash_attn_varlen_func(q, q, q, lens, lens, 100, 100, dropout_p=0.1)
    guard = "dropout ran"
except RuntimeError as e:
    guard = str(e).splitlines()[0]
q80 = torch.randn(150, 4, 80, device="cuda", dtype=torch.bfloat16)  # head dim 80: padded to 96 (lean refuses it)
try:
    flash_attn_varlen_func(q80, q80, q80, lens, lens, 100, 100)
    hd80 = "ran"
except RuntimeError as e:
    hd80 = str(e).splitlines()[0]
print(json.dumps({"flash_attn": flash_attn.__version__, "file": flash_attn.__file__, "dropout_call": guard,
                  "head_dim_80_call": hd80}))
EOF
cat "$WORK/installed.json" "$WORK/installed.err" | tail -5

echo "== a wheel with sm_80 SASS only, on this GPU"
# Real sm_80 cubin (a tiny kernel) in a wheel named for the sm_80 key, seeded into a scratch cache: what a
# cache shared with A100 instances holds. Building real flash-attn for sm_80 would cost another ~6 minutes.
SCRATCH=$WORK/cache80
printf '__global__ void k(float *x) { x[0] = 1.f; }\n' >"$WORK/k.cu"
"$NVCC" -arch=sm_80 -shared -Xcompiler -fPIC -o "$WORK/flash_attn_2_cuda.so" "$WORK/k.cu"
"$VPY" - "$WORK" "$SCRATCH" "$FA_VERSION" <<'EOF'
import sys, sysconfig, zipfile
from pathlib import Path
from builder.wheels.cache import WheelCache
from builder.core.environment import Environment
from builder.wheels.key import key_from_env
from builder.wheels.resolve import built_wheel_name
work, scratch, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
key = key_from_env(Environment.probe(), ["8.0"], "slim", version)
whl = work / built_wheel_name(key)
with zipfile.ZipFile(whl, "w") as zf:
    zf.write(work / "flash_attn_2_cuda.so", "flash_attn_2_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
WheelCache(scratch).add(key, whl, "build", ("8.0",))
EOF
REFUSE_CMD=("$VPY" -m builder wheel flash-attn --from-env --version "$FA_VERSION" --cache "$SCRATCH"
            --arch 8.0 --profile slim --offline --install)
"${REFUSE_CMD[@]}" >/dev/null 2>"$WORK/refuse.log"
refuse_rc=$?
cat "$WORK/refuse.log"

"$VPY" - "$WORK" "$OUT" "$build_rc" "$hit_rc" "$refuse_rc" "$t0" "$t1" "$t2" "$t3" \
  "${BUILD_CMD[*]}" "${HIT_CMD[*]}" "${REFUSE_CMD[*]}" "$PROFILE" <<'EOF'
import json, os, platform, subprocess, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
build_rc, hit_rc, refuse_rc = map(int, sys.argv[3:6])
t0, t1, t2, t3 = map(float, sys.argv[6:10])
build_cmd, hit_cmd, refuse_cmd, profile = sys.argv[10:14]

def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None

def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return r.stdout.strip()

import torch
build, hit = load("build.json"), load("hit.json")
wheel = Path(build["dest"]) if build and build.get("dest") else None
result = {
    "machine": {"gpu": sh("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"),
                "cores": os.cpu_count(), "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
                "os": platform.platform()},
    "versions": {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "nvcc": sh("nvcc --version | tail -2 | head -1"), "flash_attn": (build or {}).get("key", {}).get("flash_attn")},
    "profile": profile,
    "build": {"command": build_cmd, "rc": build_rc, "seconds": round(t1 - t0, 1),
              "source": (build or {}).get("source"), "steps": (build or {}).get("steps"),
              "settings": None, "wheel": wheel.name if wheel else None,
              "wheel_mb": round(wheel.stat().st_size / 2**20, 1) if wheel else None,
              "sha256": (build or {}).get("sha256"), "elf_archs": (build or {}).get("elf_archs"),
              "numeric": (build or {}).get("numeric")},
    "cache_hit_install": {"command": hit_cmd, "rc": hit_rc, "seconds": round(t3 - t2, 1),
                          "steps": (hit or {}).get("steps"), "installed": load("installed.json")},
    "sm80_wheel_on_this_gpu": {"command": refuse_cmd, "rc": refuse_rc,
                               "message": (work / "refuse.log").read_text().strip()},
}
manifest = Path(os.environ.get("CACHE", ".out/fa-cache")) / "manifest.json"
from builder.wheels import schedule
if (out / f"ninja_log_{profile}.txt").is_file():
    result["build"]["schedule"] = schedule.summarise(schedule.read_ninja_log(out / f"ninja_log_{profile}.txt"))
if (out / f"nvcc_time_{profile}.csv").is_file():
    result["build"]["nvcc_phase_cpu_s"] = schedule.nvcc_phase_seconds(out / f"nvcc_time_{profile}.csv")
if build and manifest.is_file():
    entry = json.loads(manifest.read_text())["entries"].get(build["key_id"], {})
    result["build"]["settings"] = entry.get("build")
(out / "flash_attn_build.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("build", "cache_hit_install")}, indent=1)[:3000])
EOF
rm -rf "$WORK"
