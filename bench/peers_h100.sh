#!/usr/bin/env bash
# Issue 23's run on one single-GPU machine (no network there); stages run in the order given, in one call:
#
#   bash bench/peers_h100.sh build        # flash-attn 2.8.3 lean sm_90 built by `samebox wheel flash-attn` and
#                                         # installed; meanwhile (the GPU is idle while nvcc runs) the 1.5B sweep
#   bash bench/peers_h100.sh rows sweep   # the peer table, samebox vs unsloth, 7B then 1.5B, both mixes,
#                                         # preflight on (samebox's short mix a first start, its chat mix a second
#                                         # start); then samebox's 1.5B short row under memory variants
#
# A later call on the same warm machine keeps /tmp (the installs, flash-attn, the models). Every stage first installs
# the carried wheels into /tmp/site: carry .whl (bench/peers_wheels.sh --lean; for build also the flash-attn sdist
# and setuptools/wheel/packaging wheels). SWEEP names the variants (name=VAR=value,...; default below); CALL_LIMIT
# (default 590 s) bounds the whole call, ROWS_S (default 430 s) the rows. Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: peers_h100.sh build|rows|sweep ..." >&2; exit 2; }
OUT=${OUT:-/tmp/peers-h100-out}
WORK=/tmp/peers-h100
SITE=/tmp/site
started=$(date +%s)
mkdir -p "$OUT" "$WORK" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
elapsed() { echo $(( $(date +%s) - started )); }

. bench/carried.sh

versions() {
    python3 -c "import torch, transformers, peft, bitsandbytes
try:
    import flash_attn; fa = flash_attn.__version__
except Exception as e:
    fa = f'missing ({type(e).__name__})'
print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| flash_attn', fa, '|', torch.cuda.get_device_name(0))" 2>&1 | tail -1
}

sweep() {  # samebox's 1.5B rows under memory variants, until $1 seconds into the call
    local until=$1 only=${SWEEP_ONLY:-1.5b,short,samebox}
    SWEEP=${SWEEP:-"bounded2= unbounded=SAMEBOX_OFFLOAD_IN_FLIGHT=0 mlp2048=SAMEBOX_MLP_CHUNK_TOKENS=2048 mlp1024=SAMEBOX_MLP_CHUNK_TOKENS=1024 mlp1024_bounded1=SAMEBOX_MLP_CHUNK_TOKENS=1024,SAMEBOX_OFFLOAD_IN_FLIGHT=1"}
    for variant in $SWEEP; do
        name=${variant%%=*}; vars=${variant#*=}
        left=$(( until - $(elapsed) ))
        [ "$left" -lt 45 ] && { echo "== $(elapsed)s sweep stops before $name (time)"; break; }
        echo "== $(elapsed)s $only, variant $name (${vars:-as shipped})"
        env ${vars//,/ } python3 bench/trainer_peers.py --only "$only" --gpus 0 --workdir "$WORK" \
            --out "$OUT/sweep_$name.json" --deadline "$left" --min-arm-s 30 --arm-timeout 120 >"$OUT/sweep_$name.log" 2>&1
        python3 - "$OUT/sweep_$name.json" <<'P' || true
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    s = r.get("arms", {}).get("samebox") or {}
    print(f"   {r['model']} {r['mix']}: {s.get('label_tokens_per_s', 0):.0f} label tok/s, "
          f"steps' peak {s.get('peak_allocated_gib')} GiB, phases {s.get('memory_gib')}, errors {r.get('errors')}")
P
    done
}

install_carried
for stage in "$@"; do
case "$stage" in
build)
    echo "== $(elapsed)s flash-attn lean sm_90 build in the background"
    OUT=$OUT/fa CACHE=/tmp/fa-cache SRC_DIR=.whl PROFILE=lean BUILD_TIMEOUT=${BUILD_TIMEOUT:-500} \
        bash bench/flash_attn_gpu.sh >"$OUT/fa_build.log" 2>&1 &
    fa=$!
    sweep 470
    echo "== $(elapsed)s waiting for the flash-attn build"
    wait $fa; echo "flash_attn_gpu.sh exit $?"; tail -n 25 "$OUT/fa_build.log"
    for w in "$OUT"/fa/flash_attn-*+*.whl; do
        [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$w" \
            2>&1 | grep -v "Running pip as"
    done
    rm -f "$OUT"/fa/*.whl  # too big to come back; the build's record and logs do
    versions
    ;;
rows)
    versions
    python3 -c "import flash_attn" 2>/dev/null || echo "!! no flash_attn here: every arm attends without it"
    left=$(( ${ROWS_S:-430} - $(elapsed) ))
    echo "== $(elapsed)s bench/trainer_peers.py samebox vs unsloth, 7B then 1.5B (deadline ${left}s)"
    python3 bench/trainer_peers.py --only samebox,unsloth --gpus 0 --startup-preflight --workdir "$WORK" \
        --out "$OUT/trainer_peers_h100.json" --deadline "$left" --arm-timeout 200 2>&1 | tee "$OUT/peers.log" | tail -n 40
    # The fixed header (bench/header.py) on top of the file, taken on this machine.
    python3 - "$OUT/trainer_peers_h100.json" <<'P' || true
import json, sys
from pathlib import Path
from bench.header import header
path = Path(sys.argv[1])
data = json.loads(path.read_text())
path.write_text(json.dumps({"header": header("bash bench/peers_h100.sh rows sweep"), **data}, indent=2))
P
    ;;
sweep) sweep $(( ${CALL_LIMIT:-590} - 20 )) ;;
*) echo "unknown stage $stage (build, rows, sweep)" >&2; exit 2 ;;
esac
done
(cd "$WORK" && { find . -maxdepth 1 \( -name '*.json' -o -name '*.log' \) ! -name 'tokens-*';
    find runs -name metrics.jsonl -o -name summary.json; } 2>/dev/null | tar czf "$OUT/logs.tgz" -T -)
echo "== $(elapsed)s done"
