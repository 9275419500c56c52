"""Benchmark: `samebox train` against the plain QLoRA recipe (HF Trainer, batch 1 x 16 accumulation, fp16).

Both arms load the same saved random-weight model (Qwen2.5-7B and -1.5B configs) in 4-bit, train LoRA r16/alpha32
on q_proj,v_proj over the same synthetic samples (lognormal lengths, median ~250 tokens, capped at 2048), 16
samples per optimizer step, in order, for a limited number of steps. Each arm runs in its own process (its peak
memory is its own; a crash in one still leaves the other's result). Writes one JSON file.

  python bench/trainer_vs_recipe.py --out $OUT/trainer_gpu.json            # GPU (H100/H200), ~6-8 min
  python bench/trainer_vs_recipe.py --sizes 7b --steps 50 --out $OUT/trainer_gpu.json  # 50-step loss curves, ~6 min
  python bench/trainer_vs_recipe.py --smoke --out /tmp/trainer_smoke.json  # CPU, tiny config, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from trainer_arms import QWEN, SAMPLES_PER_STEP, packing_check, prepare, recipe_arm

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "4090": 165.2}


# ----- samebox train (child process through the CLI) ----------------------------------------------------------
def samebox_config(model_dir: Path, data: Path, run_dir: Path, steps: int, budget: int, quantize: bool) -> dict:
    return {
        "model": {"name": str(model_dir), "quantization": "nf4" if quantize else "none",
                  "dtype": "bf16" if quantize else "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
        # The recipe trains on every token: so does this arm, for the same labels and a comparable loss.
        "data": {"path": str(data), "format": "prompt_completion", "max_length": 2048, "train_on_prompt": True,
                 "shuffle": False, "cache_dir": str(run_dir / "cache")},
        # Trainer defaults for lr / warmup / clipping, so the first steps' losses are comparable.
        "train": {"max_steps": steps, "samples_per_step": SAMPLES_PER_STEP, "micro_batch_tokens": budget,
                  "lr": 5e-5, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "output": {"dir": str(run_dir), "save_every_steps": 100000, "save_every_minutes": 10000.0,
                   "tensorboard": "false"},
    }


def read_samebox(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"step_s": [r["step_s"] for r in rows], "losses": [r["loss"] for r in rows],
            "label_tokens": [r["label_tokens"] for r in rows], "tokens": [r["tokens"] for r in rows],
            "micro_batches": [r["micro_batches"] for r in rows], "summary": summary,
            "peak_mem_gib": summary.get("peak_mem_gib"), "peak_reserved_gib": summary.get("peak_reserved_gib")}


# ----- measures ------------------------------------------------------------------------------------------------
def sample_lengths(data: Path) -> list[int]:
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return [len(r["prompt"]) + len(r["completion"]) + 1 for r in rows]


def lora_flops(size: str, lengths: list[int], rank: int = 16) -> float:
    """Model FLOPs of LoRA training, not 6N: forward (2 per weight) + input gradients through the frozen weights
    (2 per weight, no weight gradients), attention forward + backward (3x a causal forward), the output layer on
    label positions, and the full 6 per trainable LoRA weight. Recomputation is not counted (MFU, not HFU)."""
    d = QWEN[size]
    h, layers, inter, vocab = d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"], d["vocab_size"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    lora = layers * rank * (2 * h + h + kv)
    total = 0.0
    for t in lengths:
        total += 4 * linear * t + 4 * vocab * h * (t - 1) + 6 * layers * h * t * t + 6 * lora * t
    return total


def steady(arm: dict, skip: int) -> dict:
    """Throughput over the steps after the first ``skip`` (warm-up: allocator, kernels, autotuning)."""
    times, labels = arm["step_s"], arm["label_tokens"]
    first = skip if len(times) > skip else 0
    seconds = sum(times[first:])
    return {"steps_measured": len(times) - first, "seconds": seconds,
            "label_tokens_per_s": sum(labels[first:]) / seconds if seconds else None,
            "tokens_per_s": sum(arm["tokens"][first:]) / seconds if seconds else None, "first_step": first}


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def peak_tflops(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if name and key in name:
            return value
    return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "flash-attn", "tokenizers"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


# ----- orchestration -------------------------------------------------------------------------------------------
def child_pythonpath() -> str:
    """PYTHONPATH for child processes: the repository first, then the caller's (carried wheels in /tmp/site)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def child(argv: list[str], timeout: float, log: Path) -> tuple[int | None, float, str]:
    """Run one arm in its own process; (exit code or None on timeout, wall seconds, output tail)."""
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc: int | None = subprocess.run(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                            timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - started
    return rc, wall, log.read_text(errors="replace")[-3000:]


def run_size(size: str, opts: argparse.Namespace, deadline: float, peak: float | None) -> dict:
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    quantize = not opts.smoke
    row: dict = {"model": f"qwen2.5-{size}-config" if size != "smoke" else "tiny-qwen2 (smoke)", "errors": []}
    me = [sys.executable, str(Path(__file__).resolve())]

    def remaining() -> float:
        return deadline - time.monotonic()

    rc, wall, tail = child(me + ["--child", "prepare", "--size", size, "--workdir", str(work),
                                 "--samples", str(opts.samples), "--median", str(opts.median),
                                 "--cap", str(opts.cap)], max(1, remaining()), work / f"prepare-{size}.log")
    row["prepare_s"] = wall
    if rc != 0:
        row["errors"].append({"stage": "prepare", "exit": rc, "output": tail})
        return row
    model_dir, data = work / f"model-{size}", work / f"data-{size}.jsonl"
    rc, wall, tail = child(me + ["--child", "packing", "--model-dir", str(model_dir), "--data", str(data),
                                 "--result", str(work / f"packing-{size}.json")], max(1, remaining()),
                           work / f"packing-{size}.log")
    if rc == 0:
        row["packing_check"] = json.loads((work / f"packing-{size}.json").read_text())
    else:
        row["errors"].append({"stage": "packing", "exit": rc, "output": tail})
    steps = opts.steps
    lengths = sample_lengths(data)[: steps * SAMPLES_PER_STEP]
    step_flops = [lora_flops(size, lengths[s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP]) for s in range(steps)]

    arms = {}
    run_dir = work / f"samebox-{size}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    cfg_file = run_dir.parent / f"samebox-{size}.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(samebox_config(model_dir, data, run_dir, steps, opts.budget, quantize)))
    plans = [("samebox", [sys.executable, "-m", "builder", "train", str(cfg_file), "--no-preflight"]),
             ("recipe", me + ["--child", "recipe", "--model-dir", str(model_dir), "--data", str(data),
                              "--steps", str(steps), "--result", str(work / f"recipe-{size}.json")]
              + ([] if quantize else ["--no-quantize"]))]
    for name, argv in plans:
        if remaining() < 20:
            row["errors"].append({"stage": name, "error": "skipped: the device time budget (--budget-s) ran out"})
            continue
        rc, wall, tail = child(argv, min(opts.arm_timeout, remaining()), work / f"{name}-{size}.log")
        if rc != 0:
            row["errors"].append({"stage": name, "exit": rc, "wall_s": wall, "output": tail,
                                  "error": "timed out" if rc is None else "crashed"})
            continue
        try:
            arm = read_samebox(run_dir) if name == "samebox" else json.loads(
                (work / f"recipe-{size}.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            row["errors"].append({"stage": name, "error": f"no result: {e}", "output": tail})
            continue
        arm["end_to_end_s"] = wall
        arm["steady"] = steady(arm, opts.warmup_steps)
        measured = slice(arm["steady"]["first_step"], len(arm["step_s"]))
        flops = sum(step_flops[measured])
        if peak and arm["steady"]["seconds"]:
            arm["lora_mfu"] = flops / arm["steady"]["seconds"] / (peak * 1e12)
        arms[name] = arm
    row.update(arms)
    if "samebox" in arms and "recipe" in arms:
        try:
            row.update(compare(arms["samebox"], arms["recipe"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            row["errors"].append({"stage": "compare", "error": repr(e)})
    return row


DIFFERENCES = ("quantization: recipe BitsAndBytesConfig(load_in_4bit=True) defaults (fp4, no double quantization, "
               "fp32 compute) vs samebox NF4 + double quantization + bf16 compute",
               "precision: recipe fp16 autocast + GradScaler vs samebox bf16",
               "EOS: recipe prompt + EOS + completion (as the seed recipe) vs samebox prompt + completion + EOS",
               "LoRA dropout masks differ (different RNG use); step 1 is before any update and LoRA B = 0, "
               "so its loss is free of adapters and dropout")


def compare(s: dict, r: dict) -> dict:
    out: dict = {"label_tokens_equal": s["label_tokens"] == r["label_tokens"][: len(s["label_tokens"])]}
    if s["steady"]["label_tokens_per_s"] and r["steady"]["label_tokens_per_s"]:
        out["speedup_label_tokens_per_s"] = s["steady"]["label_tokens_per_s"] / r["steady"]["label_tokens_per_s"]
    if s.get("peak_mem_gib") and r.get("peak_mem_gib"):
        out["peak_memory_ratio"] = s["peak_mem_gib"] / r["peak_mem_gib"]
    n = min(len(s["losses"]), len(r["losses"]))
    diffs = [abs(a - b) for a, b in zip(s["losses"][:n], r["losses"][:n], strict=True)]
    signed = [a - b for a, b in zip(s["losses"][:n], r["losses"][:n], strict=True)]
    out["loss_agreement"] = {"steps": n, "samebox": s["losses"][:n], "recipe": r["losses"][:n],
                             "max_abs_diff": max(diffs) if diffs else None,
                             "first_step_abs_diff": diffs[0] if diffs else None,
                             "mean_diff_samebox_minus_recipe": sum(signed) / n if n else None,
                             "known_differences": list(DIFFERENCES)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=False, help="JSON result path")
    p.add_argument("--sizes", default="7b,1.5b", help="comma list of 7b, 1.5b")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (16 samples each)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--median", type=int, default=250)
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--budget", type=int, default=16384, help="samebox micro-batch token budget")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the throughput")
    p.add_argument("--budget-s", type=float, default=480, help="stop starting arms after this many seconds")
    p.add_argument("--arm-timeout", type=float, default=240)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--workdir", default="/tmp/samebox-trainer-bench")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config, few samples: checks the script works")
    p.add_argument("--child", choices=("prepare", "recipe", "packing"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--no-quantize", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child == "prepare":
        prepare(opts.size, Path(opts.workdir), opts.samples, opts.median, opts.cap, seed=0)
        return 0
    if opts.child == "packing":
        packing_check(Path(opts.model_dir), Path(opts.data), Path(opts.result))
        return 0
    if opts.child == "recipe":
        recipe_arm(Path(opts.model_dir), Path(opts.data), opts.steps, Path(opts.result), not opts.no_quantize)
        return 0
    if not opts.out:
        p.error("--out is required")
    if opts.smoke:
        opts.sizes, opts.samples, opts.median, opts.cap, opts.budget = "smoke", 64, 30, 128, 1024
        opts.steps = min(opts.steps, 3)
    started = time.monotonic()
    name = gpu_name()
    peak = peak_tflops(name, opts.peak_tflops)
    result: dict = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"gpu": name, "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "settings": {"steps_per_arm": opts.steps, "samples_per_step": SAMPLES_PER_STEP, "samples": opts.samples,
                     "length_median": opts.median, "length_cap": opts.cap, "samebox_micro_batch_tokens": opts.budget,
                     "peak_bf16_tflops": peak, "warmup_steps_excluded": opts.warmup_steps},
        "note": (f"Each arm ran {opts.steps} optimizer steps of {SAMPLES_PER_STEP} samples (not the full "
                 f"{opts.samples}-sample epoch) to fit the device-time budget; throughput leaves out the first "
                 f"{opts.warmup_steps} step(s); end_to_end_s includes process start, model load and tokenization. "
                 "Both arms train on every token (the recipe has no prompt masking)."),
        "rows": [],
    }
    for size in opts.sizes.split(","):
        try:
            row = run_size(size.strip(), opts, started + opts.budget_s, peak)
        except Exception:  # noqa: BLE001 - a broken row must not lose the others
            row = {"model": size, "errors": [{"stage": "bench", "error": traceback.format_exc()[-3000:]}]}
        result["rows"].append(row)
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    result["total_s"] = time.monotonic() - started
    Path(opts.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    for row in result["rows"]:
        print(summary_line(row))
    return 0 if all(not r["errors"] for r in result["rows"]) else 1


def summary_line(row: dict) -> str:
    parts = [row["model"]]
    for arm in ("recipe", "samebox"):
        if arm in row:
            a = row[arm]
            parts.append(f"{arm}: {a['steady']['label_tokens_per_s'] or 0:,.0f} label tok/s, "
                         f"{a.get('peak_mem_gib') or float('nan'):.1f} GiB, e2e {a['end_to_end_s']:.0f} s")
    if "speedup_label_tokens_per_s" in row:
        parts.append(f"speedup {row['speedup_label_tokens_per_s']:.2f}x")
    if row["errors"]:
        parts.append(f"errors: {[e['stage'] for e in row['errors']]}")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
