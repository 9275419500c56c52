#!/usr/bin/env bash
# One call on the GPU machine (a fresh torch 2.11 / CUDA 13.0 / Python 3.12 instance, samebox from this checkout on
# PYTHONPATH): the quick self-test as the trainer's preflight runs it, the fused layers' check (registered by the
# selftest command) at every backend, check-gpu, and the supported-range check, into $OUT/gpu_check.json with the
# fixed header (command, machine, GPU, driver, versions, commit, date).
#   OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:?set OUT to the results directory}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
t0=$(date +%s.%N)
$py -m builder selftest --quick --json > "$out/quick.json" 2> "$out/quick.err"; quick_rc=$?
t1=$(date +%s.%N)
$py -m builder selftest --full --kernels fused,sdpa --json > "$out/fused.json" 2> "$out/fused.err"; fused_rc=$?
t2=$(date +%s.%N)
gpu=$($py -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo unknown)
$py -m builder check-gpu --gpu "$gpu" --json > "$out/check_gpu.json" 2> "$out/check_gpu.err"; check_rc=$?
$py - "$out" "$quick_rc" "$fused_rc" "$check_rc" "$t0" "$t1" "$t2" <<'PY'
import json, sys
from pathlib import Path
out, quick_rc, fused_rc, check_rc, t0, t1, t2 = sys.argv[1], *map(int, sys.argv[2:5]), *map(float, sys.argv[5:8])
def load(name):
    try:
        return json.loads((Path(out) / name).read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{name}: {e}", "stderr": (Path(out) / name.replace(".json", ".err")).read_text()[-2000:]}
sys.path.insert(0, "bench")
from header import header
from builder.core import supported
try:
    supported.require("train"); supported.require("serve"); in_range = "yes"
except Exception as e:
    in_range = str(e)
fused = load("fused.json")
result = {
    "header": header("OUT=... bash bench/gpu_check.sh"),
    "supported_range": in_range,
    "quick": {"exit": quick_rc, "seconds": round(t1 - t0, 1), "report": load("quick.json")},
    "fused_full": {"exit": fused_rc, "seconds": round(t2 - t1, 1),
                   "fused_layers": [f for f in fused.get("findings", []) if f.get("check") == "fused_layers"] or fused},
    "check_gpu": {"exit": check_rc, "report": load("check_gpu.json")},
}
Path(out, "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
print(json.dumps({k: result[k] for k in ("supported_range",)}, indent=1))
print("quick exit", quick_rc, "in", result["quick"]["seconds"], "s; fused exit", fused_rc, "; check-gpu exit", check_rc)
print(json.dumps(result["fused_full"]["fused_layers"], default=str)[:1500])
PY
