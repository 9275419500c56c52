#!/usr/bin/env bash
# The fused layers' GPU check in one call, on a machine with two GPUs (one works too, sequentially):
#   bash bench/fused_gpu.sh            (carry .whl/base: bitsandbytes, liger-kernel, flash-attn wheels)
# GPU 0: kernels, correctness variants, layer timing with a profile; GPU 1 at the same time: 4-step `samebox train`
# runs through each fused variant and through transformers + peft. First, `samebox selftest --quick` timed on one
# GPU and on every GPU. Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fused-out}
SITE=/tmp/site
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/base/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/base/*.whl 2>&1 | grep -v "Running pip as" || true
fi
python3 -c "import torch, flash_attn, bitsandbytes, liger_kernel; print('torch', torch.__version__, 'flash_attn', flash_attn.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
for visible in 0 all; do
    t0=$(date +%s.%N)
    if [ "$visible" = all ]; then python3 -m builder selftest --quick --json >"$OUT/selftest_quick_all.json" 2>"$OUT/selftest_quick_all.err"
    else CUDA_VISIBLE_DEVICES=0 python3 -m builder selftest --quick --json >"$OUT/selftest_quick_1.json" 2>"$OUT/selftest_quick_1.err"; fi
    echo "selftest --quick on GPUs=$visible: rc $? $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
done
second=0; [ "$gpus" -gt 1 ] && second=1
CUDA_VISIBLE_DEVICES=$second python3 bench/fused_gpu.py --out "$OUT/fused_trainer.json" --stages trainer \
    >"$OUT/fused_trainer.log" 2>&1 &
pid=$!
[ "$second" = 0 ] && wait $pid
CUDA_VISIBLE_DEVICES=0 python3 bench/fused_gpu.py --out "$OUT/fused_gpu.json" --stages kernels,correctness,timing \
    --profile "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/fused_gpu.log" | tail -80
wait $pid
grep -v -i "warn\|Loading\|Writing" "$OUT/fused_trainer.log" | tail -25
