#!/usr/bin/env bash
# `samebox train` from the command to step 1 on the GPU machine's own environment (no setup.sh: one call, nothing
# but bitsandbytes carried), the shipped 7B QLoRA config on random Qwen2.5-7B weights on local disk, three starts in
# one run: a first start on a fresh instance state (the whole preflight self-test, beside the imports), a second start
# (the self-test's kernel checks reused from the first, torch's report remembered), and a start with --no-preflight
# (the floor). Each start's stages come from its summary.json (trainer/loop/startup.py).
#   carry .whl/site: bnb-site.tar.xz (bitsandbytes 0.50.2 unpacked, CUDA 13.0 and CPU libraries only) and
#   peft-0.21.2-py3-none-any.whl
#   OUT=... BENCH_COMMIT=... bash bench/startup_gpu.sh      -> $OUT/startup_gpu.json, $OUT/startup_gpu.log
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:?set OUT to the results directory}
py=${PLATFORM_PYTHON:-/opt/torch/.venv/bin/python3}
work=/tmp/startup
rm -rf "$work/runs" "$work/home" "$work/tokenized" "$work"/*.rc "$work"/*.summary.json  # a fresh state each call
mkdir -p "$out" "$work/site"
log=$out/startup_gpu.log
: > "$log"
tar -C "$work/site" -xJf .whl/site/bnb-site.tar.xz
# the platform's peft 0.21.0 is older than any lock's (samebox train refuses it): the locked one, unpacked beside
for whl in .whl/site/*.whl; do [ -f "$whl" ] && "$py" -m zipfile -e "$whl" "$work/site"; done
export PYTHONPATH=$work/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HOME=$work/home SAMEBOX_STATE=$work/home/.samebox
mkdir -p "$SAMEBOX_STATE"
echo "== making random Qwen2.5-7B weights and data (not timed)" | tee -a "$log"
[ -f "$work/model-7b/config.json" ] || "$py" bench/trainer_vs_recipe.py --child prepare --size 7b --workdir "$work" \
    --samples 200 --median 250 --cap 2048 >> "$log" 2>&1 || { echo "prepare failed" | tee -a "$log"; exit 1; }

start() {  # start NAME [ARGS...]
    local name=$1 t0
    shift
    echo "== $name" | tee -a "$log"
    t0=$(date +%s.%N)
    timeout 240 "$py" -m builder train configs/qwen2.5-7b-qlora-24gb.yaml model.name="$work/model-7b" \
        data.path="$work/data-7b.jsonl" output.dir="$work/runs/$name" train.max_steps=2 output.save_every_steps=1000 \
        data.cache_dir="$work/tokenized" "$@" >> "$log" 2>&1
    echo "$? $(python3 -c "import time; print(round(time.time() - $t0, 2))")" > "$work/$name.rc"
    cp "$work/runs/$name/summary.json" "$work/$name.summary.json" 2>/dev/null
    grep -E "step 1 at|preflight passed" "$log" | tail -n 2
}
start first
start second
start no_preflight --no-preflight

"$py" - "$work" "$out/startup_gpu.json" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from header import header  # noqa: E402

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
arms = {}
for name in ("first", "second", "no_preflight"):
    rc, wall = (work / f"{name}.rc").read_text().split()
    summary = json.loads((work / f"{name}.summary.json").read_text()) if (work / f"{name}.summary.json").is_file() \
        else {}
    startup = summary.get("startup") or {}
    arms[name] = {"exit": int(rc), "wall_s": float(wall), "seconds_to_step_1": startup.get("seconds_to", {}).get("step_1"),
                  "seconds_to": startup.get("seconds_to"), "stage_seconds": startup.get("stage_seconds"),
                  "attention": summary.get("attention"), "peak_mem_gib": summary.get("peak_mem_gib")}
result = {"header": header("OUT=$OUT bash bench/startup_gpu.sh"),
          "benchmark": "samebox train configs/qwen2.5-7b-qlora-24gb.yaml (random Qwen2.5-7B weights on local disk, "
                       "NF4, max_length 2048) from the command to step 1 in the GPU machine's own environment "
                       "(transformers/peft as installed there, bitsandbytes 0.50.2 carried, no flash-attn: SDPA); "
                       "first start on a fresh state, a second start, and --no-preflight",
          "goal_second_start_s": 30, "arms": arms}
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: (v["exit"], v["seconds_to_step_1"], v["stage_seconds"]) for k, v in arms.items()}))
EOF
