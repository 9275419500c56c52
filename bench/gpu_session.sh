#!/usr/bin/env bash
# A GPU session's measurements in three calls on one warm nvidia-h100-x2 (2 x H100), each under the device's
# 10-minute limit. Wheels are installed into /tmp/site by the first call (carry .whl/base and .whl/unsloth);
# later calls on the same warm machine reuse them and /tmp's models.
#
#   bash bench/gpu_session.sh peers      # issue 11 + 12: the quick self-test timed on one GPU alone, then the peer
#                                        # table (7B rows on GPU 0; 1.5B rows, then the 1.5B 50-step curve, on GPU 1)
#   bash bench/gpu_session.sh multigpu   # issue 13 + 12: one GPU vs two (DDP), the NCCL report, and a first
#                                        # `samebox train` into a fresh output.dir with the preflight on
#   bash bench/gpu_session.sh sharded    # issue 13: Qwen2.5-32B QLoRA, one "24 GB card" vs two sharded by FSDP2
#   bash bench/gpu_session.sh remeasure  # after a fix: quick self-test, the 7B short row, one GPU vs two, a first run
#   bash bench/gpu_session.sh final      # quick self-test, a first run of the 1.5B config, the sharded 32B
#   bash bench/gpu_session.sh scaling    # issue 13: one GPU vs two three ways (as shipped + resume, activations
#                                        # kept on the GPU, 64 samples per step), per-rank time, the topology
#   bash bench/gpu_session.sh cardcap    # quick self-test with both GPUs; Qwen2.5-32B on 16 GiB cards: one, two
#
# Everything lands in $OUT (at most 8 files come back: logs are tarred).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh peers|remeasure|final|multigpu|sharded|scaling|cardcap}
OUT=${OUT:-/tmp/gpu-session-out}
SITE=/tmp/site
started=$(date +%s)
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
elapsed() { echo $(( $(date +%s) - started )); }
logs=()

for dir in .whl/base .whl/unsloth; do
    ls "$dir"/*.whl >/dev/null 2>&1 || continue
    echo "== $(elapsed)s installing $dir ($(du -sh "$dir" | cut -f1))"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$dir"/*.whl 2>&1 | grep -v "Running pip as" || true
done
python3 -c "import torch, bitsandbytes, flash_attn; print('torch', torch.__version__, '| bnb', bitsandbytes.__version__,
      '| flash_attn', flash_attn.__version__, '| GPUs', torch.cuda.device_count())" 2>&1 | tail -1
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader

quick_selftest() {  # issue 12: `samebox selftest --quick` timed on GPU 0 alone (limit: $1 seconds)
    CUDA_VISIBLE_DEVICES=0 timeout "$1" python3 bench/selftest_gpu.py --parts quick,quick_cli \
        --out "$OUT/selftest_quick.json" 2>&1 | tee "$OUT/selftest_quick.log" | grep -E "^(quick|quick_cli):"
}

first_run() {  # issue 12: `samebox train CONFIG` into an output.dir that does not exist yet, the preflight on
    local config=${1:-configs/qwen2.5-7b-qlora-24gb.yaml} size=${2:-7b} w=${3:-/tmp/samebox-multigpu-train}
    echo "== $(elapsed)s first run: samebox train into a fresh output.dir, preflight on (issue 12)"
    [ -f "$w/model-$size/tokenizer.json" ] || python3 bench/trainer_vs_recipe.py --child prepare --size "$size" \
        --workdir "$w" --samples 200 --median 250 --cap 2048 2>&1 | tail -n 2
    fresh=/tmp/fresh-$(date +%s)/runs/first-run
    echo "\$ python3 -m builder train $config model.name=$w/model-$size" \
        "data.path=$w/data-$size.jsonl output.dir=$fresh train.max_steps=3" >/tmp/first_run.log
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m builder train "$config" model.name=$w/model-$size \
        data.path=$w/data-$size.jsonl output.dir=$fresh train.max_steps=3 >>/tmp/first_run.log 2>&1
    echo "exit $?" >> /tmp/first_run.log
    head -n 30 /tmp/first_run.log; echo ...; tail -n 6 /tmp/first_run.log
    cp /tmp/first_run.log "$OUT/first_run.log"
}

case "$stage" in
peers)
    echo "== $(elapsed)s selftest --quick on GPU 0 alone (issue 12's quick.wall_s)"
    quick_selftest 150
    left=$(( 560 - $(elapsed) ))
    echo "== $(elapsed)s peers: 7B rows on GPU 0, 1.5B rows then the 1.5B curve on GPU 1 (${left}s left)"
    python3 bench/trainer_peers.py --only 7b --gpus 0 --workdir /tmp/peers-7b --out "$OUT/peers_7b.json" \
        --deadline $(( left - 150 )) --arm-timeout 200 >/tmp/peers_7b.log 2>&1 &
    p7=$!
    (
        python3 bench/trainer_peers.py --only 1.5b --gpus 1 --workdir /tmp/peers-1.5b --out "$OUT/peers_1.5b.json" \
            --deadline $(( left - 190 )) --arm-timeout 150 >/tmp/peers_1.5b.log 2>&1
        now=$(( $(date +%s) - started ))
        python3 bench/trainer_peers.py --curve --curve-model 1.5b --curve-mix chat --gpus 1 --workdir /tmp/peers-1.5b \
            --out "$OUT/peers_curve.json" --deadline $(( 540 - now - 60 )) >/tmp/peers_curve.log 2>&1
    ) &
    p15=$!
    wait $p7; rc=$?; echo "== $(elapsed)s 7B rows done (exit $rc)"; tail -n 12 /tmp/peers_7b.log
    wait $p15; rc=$?; echo "== $(elapsed)s 1.5B rows + curve done (exit $rc)"; tail -n 12 /tmp/peers_1.5b.log
    tail -n 8 /tmp/peers_curve.log
    logs+=(/tmp/peers_7b.log /tmp/peers_1.5b.log /tmp/peers_curve.log)
    (cd /tmp && find peers-7b peers-1.5b -maxdepth 1 \( -name '*.log' -o -name '*.json' \) ! -name 'tokens-*' \
        2>/dev/null; find peers-7b peers-1.5b -name metrics.jsonl 2>/dev/null) | sed 's|^|/tmp/|' > /tmp/arm_logs.txt
    mapfile -t arm_logs < /tmp/arm_logs.txt
    [ ${#arm_logs[@]} -gt 0 ] && logs+=("${arm_logs[@]}")
    ;;
multigpu)
    echo "== $(elapsed)s one GPU vs two, same global batch (bench/multigpu_train.py)"
    python3 bench/multigpu_train.py --out "$OUT/multigpu_train.json" --budget-s 300 2>&1 | tee /tmp/multigpu_train.log \
        | grep -v -i "warn" | tail -n 40
    echo "== $(elapsed)s NCCL report (bench/multigpu_selftest.py)"
    timeout 150 python3 bench/multigpu_selftest.py --out "$OUT/multigpu_selftest.json" 2>&1 \
        | tee /tmp/multigpu_selftest.log | tail -n 25
    first_run
    logs+=(/tmp/multigpu_train.log /tmp/multigpu_selftest.log)
    ;;
remeasure)
    # After a fix: the quick self-test alone on GPU 0, the 7B short row's peers (samebox, unsloth, HF padding-free),
    # one GPU vs two, and the first run with the preflight on.
    echo "== $(elapsed)s selftest --quick on GPU 0 alone"
    quick_selftest 150
    echo "== $(elapsed)s peers: the 7B short row on GPU 0"
    python3 bench/trainer_peers.py --only 7b,short,samebox,unsloth,hf_padding_free --gpus 0 --workdir /tmp/peers-7b \
        --out "$OUT/peers_7b_short.json" --deadline 170 --arm-timeout 120 >/tmp/peers_7b.log 2>&1
    rc=$?; echo "== $(elapsed)s (exit $rc)"; tail -n 8 /tmp/peers_7b.log
    echo "== $(elapsed)s one GPU vs two (bench/multigpu_train.py)"
    python3 bench/multigpu_train.py --out "$OUT/multigpu_train.json" --budget-s 200 2>&1 \
        | tee /tmp/multigpu_train.log | grep -v -i "warn" | tail -n 6
    first_run
    logs+=(/tmp/peers_7b.log /tmp/multigpu_train.log)
    ;;
final)
    # The quick self-test alone on GPU 0, a first run of the 1.5B config, then the sharded 32B (sharded first,
    # then the one capped card with the time left: the weights are written once).
    echo "== $(elapsed)s selftest --quick on GPU 0 alone"
    quick_selftest 120
    first_run configs/qwen2.5-1.5b-lora.yaml 1.5b /tmp/first-run-model
    echo "== $(elapsed)s Qwen2.5-32B QLoRA sharded over two capped GPUs, then one capped card"
    python3 bench/multigpu_train.py --size 32b --shard --gib-per-gpu 23.5 --parts sharded --part-timeout 300 \
        --out "$OUT/multigpu_sharded.json" --budget-s $(( 545 - $(elapsed) )) 2>&1 \
        | tee /tmp/multigpu_sharded.log | grep -v -i "warn" | tail -n 12
    left=$(( 560 - $(elapsed) ))
    echo "== $(elapsed)s one capped card (${left}s left)"
    [ "$left" -gt 70 ] && python3 bench/multigpu_train.py --size 32b --shard --gib-per-gpu 23.5 --parts one_card \
        --out "$OUT/multigpu_one_card.json" --budget-s "$left" 2>&1 | tee /tmp/multigpu_one_card.log \
        | grep -v -i "warn" | tail -n 8
    logs+=(/tmp/multigpu_sharded.log /tmp/multigpu_one_card.log /tmp/samebox-multigpu-train/*.log)
    free -g | head -2; df -h /tmp | tail -1
    ;;
scaling)
    # Issue 13: where two GPUs lose against one. The same 7B runs three ways, each one GPU vs two with per-rank
    # compute / all-reduce / host time: as shipped (with the SIGTERM + --resume auto part), activations kept on
    # the GPU (no host offload), and a global batch twice as large (twice the tokens per micro-batch).
    nvidia-smi topo -m > "$OUT/topology.txt" 2>&1; lscpu | grep -i -E "numa|socket|model name" >> "$OUT/topology.txt"
    echo "== $(elapsed)s A: as shipped, 40 steps, then SIGTERM + --resume auto"
    python3 bench/multigpu_train.py --out "$OUT/mg_shipped.json" --budget-s 300 2>&1 | tee /tmp/mg_shipped.log \
        | grep -v -i "warn" | tail -n 3
    echo "== $(elapsed)s B: train.offload_activations=false, 30 steps"
    python3 bench/multigpu_train.py --out "$OUT/mg_kept.json" --parts one_gpu,gpus --steps 30 \
        --set train.offload_activations=false --budget-s 150 2>&1 | tee /tmp/mg_kept.log | grep -v -i "warn" | tail -n 3
    left=$(( 575 - $(elapsed) ))
    echo "== $(elapsed)s C: 64 samples per step, 20 steps (${left}s left)"
    [ "$left" -gt 100 ] && python3 bench/multigpu_train.py --out "$OUT/mg_batch64.json" --parts one_gpu,gpus \
        --steps 20 --samples-per-step 64 --budget "${BATCH64_BUDGET:-16384}" --budget-s $(( left - 60 )) \
        --part-timeout $(( (left - 10) / 2 )) 2>&1 | tee /tmp/mg_batch64.log | grep -v -i "warn" | tail -n 3
    for f in "$OUT"/mg_*.json; do python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[-1], "speedup", d.get("speedup_label_tokens_per_s"), "curves", d.get("loss_curves"),
      "resumed", d.get("resumed_vs_uninterrupted"), "errors", [e["stage"] for e in d.get("errors", [])])
print("  scaling", json.dumps(d.get("scaling")))
PY
    done
    logs+=(/tmp/mg_shipped.log /tmp/mg_kept.log /tmp/mg_batch64.log /tmp/samebox-multigpu-train/*.log)
    ;;
cardcap)
    # Issue 12: the quick self-test with both GPUs (the all-reduce included). Issue 13: a model whose 4-bit
    # weights do not fit one card: Qwen2.5-32B (~18 GB of NF4 weights) on GPUs held to 16 GiB each, one card
    # (expected: "do not fit one GPU", exit 2) and two sharded by FSDP2 with 1,024-token micro-batches (samples
    # capped at 1,024 tokens too: a longer one would make a micro-batch of its own length).
    echo "== $(elapsed)s selftest --quick with both GPUs"
    timeout 150 python3 bench/selftest_gpu.py --parts quick,quick_cli --out "$OUT/selftest_quick_2gpu.json" 2>&1 \
        | tee "$OUT/selftest_quick_2gpu.log" | grep -E "^(quick|quick_cli):"
    echo "== $(elapsed)s Qwen2.5-32B QLoRA on 16 GiB cards: one, then two sharded"
    python3 bench/multigpu_train.py --size 32b --shard --gib-per-gpu 16 --budget 1024 --cap 1024 --parts one_card,sharded \
        --part-timeout 330 --out "$OUT/multigpu_16gib.json" --budget-s $(( 560 - $(elapsed) )) 2>&1 \
        | tee /tmp/multigpu_16gib.log | grep -v -i "warn" | tail -n 12
    logs+=(/tmp/multigpu_16gib.log /tmp/samebox-multigpu-train/*.log)
    free -g | head -2; df -h /tmp | tail -1
    ;;
sharded)
    echo "== $(elapsed)s Qwen2.5-32B QLoRA: one capped card vs two sharded (bench/multigpu_train.py --shard)"
    python3 bench/multigpu_train.py --size 32b --shard --gib-per-gpu 23.5 --out "$OUT/multigpu_sharded.json" \
        --budget-s "${SHARD_BUDGET_S:-470}" ${SHARD_PARTS:+--parts "$SHARD_PARTS"} 2>&1 \
        | tee /tmp/multigpu_sharded.log | grep -v -i "warn" | tail -n 50
    logs+=(/tmp/multigpu_sharded.log)
    free -g | head -2; df -h /tmp | tail -1
    ;;
*)
    echo "unknown stage $stage: peers | remeasure | final | multigpu | sharded | scaling | cardcap" >&2
    exit 2
    ;;
esac
[ ${#logs[@]} -gt 0 ] && tar czf "$OUT/logs.tgz" "${logs[@]}" 2>/dev/null
echo "== $(elapsed)s done: $(ls "$OUT" | tr '\n' ' ')"
