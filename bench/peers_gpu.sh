#!/usr/bin/env bash
# The peer benchmark in one GPU call (the GPU machine has no network): install the carried wheels into /tmp/site,
# check that unsloth imports (its error printed in full if not: the other arms still run), then run
# bench/trainer_peers.py with the arguments given, writing into $OUT.
#
#   bash bench/peers_wheels.sh --lean      # here, once: .whl/unsloth-lean/ (~10 MB), or without --lean the full
#                                          # set .whl/unsloth/ (~40 MB); .whl/base/ holds bitsandbytes + flash-attn
#   SAMEBOX_COMMIT=$(git rev-parse HEAD) bash bench/peers_gpu.sh --gpus 0,1          # on the GPU machine
#   bash bench/peers_gpu.sh --only 7b,chat --gpus 0                                   # a part of it
#
# Wheels go into /tmp/site with --upgrade, so a later call on the same warm machine keeps what an earlier one
# installed (carry .whl/base in one call and .whl/unsloth in the next). CALL_LIMIT (default 600 s) sets the
# benchmark's --deadline to what is left of the call after the installs; an explicit --deadline wins.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
OUT=${OUT:-/tmp/peers-out}
WORKDIR=${WORKDIR:-/tmp/samebox-peers}
SITE=/tmp/site
mkdir -p "$OUT" "$WORKDIR" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1

. bench/carried.sh
install_carried
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|peft|accelerate|bitsandbytes|flash.attn|unsloth|unsloth.zoo|trl|datasets|torchao|certifi|fsspec|typing.extensions|pydantic|huggingface.hub) " \
    | tee "$OUT/packages.txt"

echo "== python -c 'import unsloth'"
# In /tmp: unsloth writes a compiled cache into the working directory.
if (cd /tmp && timeout 240 python3 -c "import unsloth, unsloth_zoo, trl
print('unsloth', unsloth.__version__, '| unsloth_zoo', unsloth_zoo.__version__, '| trl', trl.__version__)") \
        >"$OUT/unsloth_import.log" 2>&1; then
    tail -n 4 "$OUT/unsloth_import.log"
else
    echo "!! import unsloth FAILED; the unsloth arm will report the same. Its output:"
    tail -n 60 "$OUT/unsloth_import.log"
fi

left=$(( ${CALL_LIMIT:-600} - ($(date +%s) - started) - 40 ))
echo "== bench/trainer_peers.py (deadline ${left} s)"
python3 bench/trainer_peers.py --out "$OUT/trainer_peers.json" --workdir "$WORKDIR" --deadline "$left" "$@" 2>&1 \
    | tee "$OUT/peers.log"
rc=${PIPESTATUS[0]}
# Each arm's log, plan and raw result, and samebox's metrics (not the models, data or tokens).
(cd "$WORKDIR" && { find . -maxdepth 1 -name '*.json' ! -name 'tokens-*'; find . -maxdepth 1 -name '*.log';
    find runs -name metrics.jsonl -o -name summary.json; } 2>/dev/null | tar czf "$OUT/peer_logs.tgz" -T -)
exit "$rc"
