#!/usr/bin/env bash
# A bare instance to its first training step, timed per stage (the GPU machine as a fresh torch2.11-cu130-py312
# platform instance): setup.sh offline from a wheelhouse, then the shipped 7B QLoRA config (random Qwen2.5-7B weights
# on local disk) to step 1; a second start on the same instance; setup.sh again (changes nothing); then a second
# instance of the region: the packages setup installed removed, the instance's state gone, the page cache dropped,
# the region's shared caches (uv/pip, wheels, file-check findings and torch's report, compiled kernels) kept; setup.sh
# and the 7B config to step 1 again. The host's speed is recorded too: lent H100 hosts differ (up to 1.6x per core).
# One results file with the fixed header: $OUT/first_step_gpu.json (logs: $OUT/first_step_gpu.log).
#
# The wheelhouse travels in parts under 64 MiB (the packages the platform lacks or has at other versions), copied to
# /tmp/samebox-wheelhouse by calls made back to back on one held machine:
#   bash bench/first_step_gpu.sh wheels     # with .whl/part-N carried: adds them
#   bash bench/first_step_gpu.sh run        # with the last part carried: adds it, then measures
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
out=${OUT:?set OUT to the results directory}
py=${PLATFORM_PYTHON:-/opt/torch/.venv/bin/python3}
wh=/tmp/samebox-wheelhouse
mkdir -p "$out" "$wh"
for f in .whl/part-*/*.whl; do [ -f "$f" ] && cp "$f" "$wh/"; done
echo "wheelhouse: $(ls "$wh" | wc -l) wheels, $(du -sh "$wh" | cut -f1)"
[ "$mode" = wheels ] && exit 0

work=/tmp/first-step
rm -rf "$work/i1" "$work/i2" "$work/runs" "$work/region-cache" "$work"/*.rc "$work"/*.wall "$work"/*.json "$work/drop_caches"
mkdir -p "$work" "$work/runs"
# The bare platform's site-packages but torch, triton and nvidia-* (setup never touches those), kept across calls on
# one held machine: a second instance starts from exactly these again. POSIX format: the files come back with their
# mtimes to the nanosecond, as two instances of one image see the same files (a GNU tar would cut them to seconds,
# and every restored package would look changed to the file-check findings).
site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
keep=(! -name 'torch' ! -name 'torch-*' ! -name 'triton' ! -name 'triton-*' ! -name 'nvidia*' ! -name '_sandboxing*')
[ -s "$work/platform-site.posix.tar" ] || (cd "$site" && find . -mindepth 1 -maxdepth 1 "${keep[@]}" -print0 \
    | tar --format=posix --null -cf "$work/platform-site.posix.tar" -T -)
log=$out/first_step_gpu.log
: > "$log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The GPU machine's own sandbox hook rewrites certifi's cacert.pem at every interpreter start, which setup would rightly
# report as drift (certifi's files differ from its RECORD): moved aside for the run, put back however it ends.
hook=$site/_sandboxing_egress_ca.pth
rm -f "$work/hook-moved"
# a run killed at the call's limit (no EXIT trap then) left the hook aside: back first, moved aside again below
[ -f "$work/hook.pth" ] && [ ! -f "$hook" ] && mv "$work/hook.pth" "$hook"
if [ -f "$hook" ]; then
    mv "$hook" "$work/hook.pth" && touch "$work/hook-moved"
    trap 'mv "$work/hook.pth" "$hook"' EXIT
fi
command -v uv > "$work/uv" || rm -f "$work/uv"
ls "$wh" | wc -l > "$work/wheels"
began=$(date +%s.%N)
elapsed() { python3 -c "import time; print(f'{time.time() - $began:.0f}')"; }
note() { echo "== $(elapsed)s $*" | tee -a "$log"; }

# Untimed: the model and data a user would have downloaded to the data disk.
note "making random Qwen2.5-7B weights and data (not timed)"
[ -f "$work/model-7b/config.json" ] && [ -f "$work/data-7b.jsonl" ] || "$py" bench/trainer_vs_recipe.py --child prepare --size 7b --workdir "$work" --samples 200 --median 250 --cap 2048 \
    >> "$log" 2>&1 || { echo "prepare failed" | tee -a "$log"; exit 1; }
model=$work/model-7b data=$work/data-7b.jsonl cache=$work/region-cache
# Untimed: how fast this host is (lent H100 hosts differ by up to 1.6x in one core's speed): one core's sha256 and a
# Python loop, so runs on different hosts can be compared stage by stage.
"$py" - > "$work/host.json.tmp" <<'PY'
import hashlib, json, os, time
buf = os.urandom(256 << 20)
t = time.perf_counter(); hashlib.sha256(buf).hexdigest(); sha = time.perf_counter() - t
t = time.perf_counter(); sum(i * i for i in range(5_000_000)); loop = time.perf_counter() - t
print(json.dumps({"sha256_one_core_gib_s": round(0.25 / sha, 2), "python_loop_5m_s": round(loop, 3)}))
PY
[ -s "$work/host.json.tmp" ] && mv "$work/host.json.tmp" "$work/host.json"
note "host: $(cat "$work/host.json")"

timed() {  # timed NAME CMD...: wall seconds of CMD into $work/NAME.wall, its output into the log
    local name=$1 t0 rc
    shift
    t0=$(date +%s.%N)
    timeout 300 "$@" >> "$log" 2>&1
    rc=$?
    python3 -c "import time; print(round(time.time() - $t0, 2))" > "$work/$name.wall"
    echo "$rc" > "$work/$name.rc"
    note "$name: exit $rc in $(cat "$work/$name.wall") s"
}

instance() {  # instance N: a fresh HOME and state; setup.sh, then the 7B config to step 1 (twice on the first)
    local n=$1
    export HOME=$work/i$n/home SAMEBOX_STATE=$work/i$n/home/.samebox
    mkdir -p "$HOME"
    note "instance $n: setup.sh"
    timed "i$n-setup" bash setup.sh --python "$py" --offline --wheelhouse "$wh" --cache-dir "$cache" --no-flash-attn
    cp "$SAMEBOX_STATE/setup-timings.json" "$work/i$n-setup-timings.json" 2>/dev/null
    # shellcheck disable=SC1091
    . "$SAMEBOX_STATE/env.sh"
    local starts=1
    [ "$n" = 1 ] && [ -z "${ONLY_INSTANCES:-}" ] && starts=2
    for s in $(seq 1 "$starts"); do
        note "instance $n: samebox train, start $s"
        timed "i$n-train$s" "$py" -m builder train configs/qwen2.5-7b-qlora-24gb.yaml model.name="$model" \
            data.path="$data" output.dir="$work/runs/i$n-$s" train.max_steps=2 output.save_every_steps=1000 \
            data.cache_dir="$work/i$n/tokenized"
        cp "$work/runs/i$n-$s/summary.json" "$work/i$n-train$s-summary.json" 2>/dev/null
    done
}

(  # each instance in its own shell: nothing of one's env.sh reaches the next
instance 1
if [ -z "${ONLY_INSTANCES:-}" ]; then  # ONLY_INSTANCES=1: the two instances alone (a call with little time left)
note "instance 1: setup.sh again (changes nothing)"
timed i1-setup-again bash setup.sh --python "$py" --offline --wheelhouse "$wh" --cache-dir "$cache" --no-flash-attn
cp "$SAMEBOX_STATE/setup-timings.json" "$work/i1-setup-again-timings.json" 2>/dev/null
fi
# Untimed: where the trainer's first seconds go before its "command" mark (the interpreter, its .pth files, the CLI)
"$py" -X importtime -c "import builder.cli" 2> "$out/first_step_importtime.txt"
{ /usr/bin/time -f "bare interpreter %e s" "$py" -c pass; /usr/bin/time -f "interpreter -S %e s" "$py" -S -c pass
  /usr/bin/time -f "import builder.cli %e s" "$py" -c "import builder.cli"; } >> "$log" 2>&1
)

if [ "$(elapsed)" -gt "${SECOND_INSTANCE_AFTER_S:-330}" ]; then
    note "no time left for the second instance"
else
# A second instance of the region: the platform's site-packages as they were before setup (a fresh copy of the
# platform image), the instance's state gone; the shared caches stay. The page cache is dropped where the kernel lets us.
note "instance 2: removing what setup installed, the state, the page cache"
find "$site" -mindepth 1 -maxdepth 1 "${keep[@]}" -exec rm -rf {} +
tar -C "$site" -xf "$work/platform-site.posix.tar"
rm -rf "$work/i1/home"
sync
if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo dropped > "$work/drop_caches"; else echo kept > "$work/drop_caches"; fi
( instance 2 )
fi

note "writing $out/first_step_gpu.json"
"$py" - "$work" "$out/first_step_gpu.json" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from header import header  # noqa: E402

work, dest = Path(sys.argv[1]), Path(sys.argv[2])


def read(name, default=None):
    path = work / name
    if not path.is_file():
        return default
    text = path.read_text().strip()
    return json.loads(text) if name.endswith(".json") else text


def start(name):
    summary = read(f"{name}-summary.json") or {}
    s = summary.get("startup") or {}
    return {"exit": int(read(f"{name}.rc", "-1")), "wall_s": float(read(f"{name}.wall", "0")),
            "seconds_to_step_1": (s.get("seconds_to") or {}).get("step_1"),
            "stage_seconds": s.get("stage_seconds"), "prefetch": s.get("prefetch") or s.get("weights_prefetch"),
            "attention": summary.get("attention"), "peak_mem_gib": summary.get("peak_mem_gib")}


def setup(name, timings):
    t = read(timings) or {}
    return {"exit": int(read(f"{name}.rc", "-1")), "wall_s": float(read(f"{name}.wall", "0")),
            "step_seconds": t.get("step_seconds"), "selftest_passed": t.get("selftest_passed"),
            "selftest_own_s": t.get("selftest_own_s"), "readahead": t.get("readahead")}  # it runs beside the fingerprint: the step is what was left


result = {
    "header": header("OUT=$OUT bash bench/first_step_gpu.sh run"),
    "benchmark": "a bare torch2.11-cu130-py312 instance (the GPU machine's /opt/torch/.venv) to step 1 of "
                 "configs/qwen2.5-7b-qlora-24gb.yaml (random Qwen2.5-7B weights on local disk, max_length 2048, "
                 "NF4), setup.sh offline from a wheelhouse of the packages the platform lacks, flash-attn off "
                 "(no wheel carried: SDPA)",
    "host_speed": read("host.json"),
    "goals": {"first_instance_to_step_1_s": 90, "second_instance_to_step_1_s": 45, "setup_again_s": 10,
              "second_start_to_step_1_s": 30},
    "first_instance": {"setup": setup("i1-setup", "i1-setup-timings.json"), "train": start("i1-train1")},
    "second_start": start("i1-train2") if (work / "i1-train2.rc").is_file() else "not run (ONLY_INSTANCES)",
    "setup_again": setup("i1-setup-again", "i1-setup-again-timings.json")
    if (work / "i1-setup-again.rc").is_file() else "not run (ONLY_INSTANCES)",
    "second_instance": {"setup": setup("i2-setup", "i2-setup-timings.json"), "train": start("i2-train1"),
                        "page_cache": read("drop_caches")},
    "notes": ["to_step_1_s = setup.sh's wall seconds + the trainer's seconds from its process start to step 1",
              "the second instance: the platform's site-packages restored as they were before setup (torch, triton "
              "and nvidia-* untouched), the instance's state removed, the page cache dropped, the region's caches "
              "(uv, pip, wheels, file-check findings and torch's report, compiled kernels: CUDA's JIT cache, "
              "Triton's) kept",
              "setup's self-test runs beside its fingerprint: the selftest step's seconds are what was left after "
              "the fingerprint; selftest_own_s is its own wall time",
              "the platform's site-packages are restored from a POSIX tar (mtimes to the nanosecond, as two "
              "instances of one image have them)",
              "no flash-attn wheel was carried (--no-flash-attn): the trainer ran on SDPA",
              "uv on PATH: setup installed with uv" if read("uv") else "no uv on PATH: setup installed with pip",
              f"the wheelhouse: {read('wheels')} wheels, the locked packages this platform lacks or has at other "
              "versions (bench/first_step_wheels.txt)"]
             + (["the GPU machine's own sandbox hook (_sandboxing_egress_ca.pth) rewrites certifi's cacert.pem at "
                 "every interpreter start (setup would report that as drift): moved aside for the run"]
                if (work / "hook-moved").exists() else []),
}
for key in ("first_instance", "second_instance"):
    part = result[key]
    step_1 = part["train"]["seconds_to_step_1"]
    part["to_step_1_s"] = None if step_1 is None else round(part["setup"]["wall_s"] + step_1, 1)
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k].get("to_step_1_s") for k in ("first_instance", "second_instance")
                  if isinstance(result[k], dict)}))
print("second start:", result["second_start"], "setup again:", result["setup_again"])
EOF
tail -n 5 "$log"
