"""`samebox train` on one GPU and under torchrun on N GPUs, same samples per step: the trainer part of
bench/results/multigpu.json.

    python bench/multigpu_train.py --out $OUT/multigpu_train.json             # 2+ GPUs, ~5 min, needs bitsandbytes
    python bench/multigpu_train.py --smoke --out /tmp/multigpu_train.json     # CPU: gloo, tiny model, ~1 min

Random weights from the public Qwen2.5-7B config and synthetic samples (bench/trainer_vs_recipe.py prepares both),
QLoRA on all linear layers without dropout, at a learning rate high enough that the loss falls (the letters' unigram
distribution is learnable), so the curves can disagree. Parts: (1) one process on GPU 0; (2) torchrun with N
processes, one per GPU; (3) torchrun again, SIGTERM to the launcher after a few steps, then --resume auto to the
end: the resumed curve must continue the uninterrupted one. Writes the loss curves, their largest relative
difference, label tokens/s (first step left out), peak memory of rank 0, wall times and the machine. Each part
survives the others failing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import trainer_vs_recipe as tvr  # noqa: E402 - the sibling benchmark's preparation, measures and versions

TOLERANCE = 0.02  # relative, per step: bf16 / NF4 arithmetic over different micro-batch shapes, 40 updates


def train_config(model_dir: Path, data: Path, run_dir: Path, opts: argparse.Namespace) -> dict:
    return {
        "model": {"name": str(model_dir), "quantization": "none" if opts.no_quantize else "nf4",
                  "dtype": "fp32" if opts.smoke else "bf16"},
        # No dropout: one process and N processes would draw different masks for the same samples.
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data), "format": "prompt_completion", "max_length": opts.cap, "train_on_prompt": True,
                 "shuffle": True, "cache_dir": str(run_dir.parent / "cache")},
        "train": {"max_steps": opts.steps, "samples_per_step": opts.samples_per_step,
                  "micro_batch_tokens": opts.budget, "lr": opts.lr, "warmup_ratio": 0.0, "seed": 42},
        "output": {"dir": str(run_dir), "save_every_steps": 100000, "save_every_minutes": 10000.0, "keep_last": 2,
                   "tensorboard": "false"},
    }


def launch(nproc: int, config: Path, log: Path, timeout: float, extra: tuple[str, ...] = (),
           stop_after_rows: int | None = None, run_dir: Path | None = None) -> dict:
    """One `samebox train`: plain for one process, torchrun otherwise; optionally SIGTERM once enough steps ran."""
    train = ["-m", "builder.cli", "train", str(config), "--no-preflight", *extra]
    if nproc == 1:
        argv = [sys.executable, *train]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *train]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    started = time.perf_counter()
    signalled_at = None
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        if stop_after_rows is not None and run_dir is not None:
            while proc.poll() is None and len(rows_of(run_dir)) < stop_after_rows and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                signalled_at = len(rows_of(run_dir))
        try:
            rc: int | None = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    out = {"argv": " ".join(argv[1:]), "exit": rc, "wall_s": time.perf_counter() - started,
           "output_tail": log.read_text(errors="replace")[-2000:]}
    if signalled_at is not None:
        out["sigterm_after_step"] = signalled_at
    return out


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measured(run_dir: Path, skip: int) -> dict:
    rows = rows_of(run_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    arm = {"losses": [r["loss"] for r in rows], "label_tokens": [r["label_tokens"] for r in rows],
           "tokens": [r["tokens"] for r in rows], "step_s": [r["step_s"] for r in rows],
           "micro_batches": [r["micro_batches"] for r in rows], "summary": summary,
           "peak_mem_gib_rank0": summary.get("peak_mem_gib")}
    arm["steady"] = tvr.steady(arm, skip)
    return arm


def curve_diff(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n], strict=True)]
    worst = max(rel) if rel else None
    return {"steps": n, "max_rel_diff": worst, "tolerance": TOLERANCE,
            "within": worst is not None and worst <= TOLERANCE}


def run(opts: argparse.Namespace, deadline: float) -> dict:
    import torch

    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nproc = opts.nproc or (2 if opts.smoke else torch.cuda.device_count())
    result: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv),
                    "machine": {"gpu": tvr.gpu_name(), "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(),
                                "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                                if torch.cuda.is_available() else None},
                    "versions": tvr.versions(), "settings": {k: v for k, v in vars(opts).items() if k != "out"},
                    "processes": nproc, "errors": []}
    if nproc < 2:
        result["errors"].append({"stage": "machine", "error": f"{nproc} GPU(s) visible; this needs 2 or more"})
        return result
    me = [sys.executable, str(BENCH / "trainer_vs_recipe.py")]
    prep = subprocess.run(me + ["--child", "prepare", "--size", opts.size, "--workdir", str(work), "--samples",
                                str(opts.samples), "--median", str(opts.median), "--cap", str(opts.cap)],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if prep.returncode != 0:
        result["errors"].append({"stage": "prepare", "output": (prep.stdout + prep.stderr)[-3000:]})
        return result
    model_dir, data = work / f"model-{opts.size}", work / f"data-{opts.size}.jsonl"
    parts = {"one_gpu": 1, f"{nproc}_gpus": nproc, "interrupted": nproc}
    for name, n in parts.items():
        timeout = min(opts.part_timeout, deadline - time.monotonic())
        if timeout < 60:
            result["errors"].append({"stage": name, "error": "skipped: the time budget (--budget-s) ran out"})
            continue
        run_dir = work / f"run-{name}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        run_dir.mkdir(parents=True)
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(train_config(model_dir, data, run_dir, opts)))
        try:
            if name == "interrupted":
                first = launch(n, config, work / f"{name}-1.log", timeout / 2, stop_after_rows=opts.stop_after,
                               run_dir=run_dir)
                second = launch(n, config, work / f"{name}-2.log", max(1.0, deadline - time.monotonic()),
                                ("--resume", "auto"))
                result[name] = {"launches": [first, second], **measured(run_dir, opts.warmup_steps),
                                "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
            else:
                result[name] = {"launch": launch(n, config, work / f"{name}.log", timeout),
                                **measured(run_dir, opts.warmup_steps)}
        except Exception as e:  # noqa: BLE001 - a broken part must not lose the others
            result["errors"].append({"stage": name, "error": repr(e)})
    one, many = result.get("one_gpu"), result.get(f"{nproc}_gpus")
    if one and many:
        result["loss_curves"] = curve_diff(many["losses"], one["losses"])
        s1, sn = one["steady"]["label_tokens_per_s"], many["steady"]["label_tokens_per_s"]
        result["speedup_label_tokens_per_s"] = sn / s1 if s1 and sn else None
        result["same_label_tokens"] = one["label_tokens"] == many["label_tokens"]
    if many and result.get("interrupted"):
        result["resumed_vs_uninterrupted"] = curve_diff(result["interrupted"]["losses"], many["losses"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--size", default="7b", choices=sorted(tvr.QWEN), help="public Qwen2.5 config to copy")
    p.add_argument("--nproc", type=int, default=None, help="processes for the multi-GPU parts (default: all GPUs)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--samples-per-step", type=int, default=32, help="global: split over the processes")
    p.add_argument("--budget", type=int, default=16384, help="micro-batch token budget per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--median", type=int, default=250)
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--stop-after", type=int, default=5, help="SIGTERM the interrupted part after this many steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the throughput")
    p.add_argument("--part-timeout", type=float, default=240)
    p.add_argument("--budget-s", type=float, default=540, help="start no part after this many seconds")
    p.add_argument("--no-quantize", action="store_true", help="bf16 LoRA instead of NF4 (no bitsandbytes)")
    p.add_argument("--workdir", default="/tmp/samebox-multigpu-train")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config, 2 gloo processes: checks the script")
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.size, opts.samples, opts.median, opts.cap, opts.budget = "smoke", 128, 30, 128, 1024
        opts.steps, opts.samples_per_step, opts.lr, opts.no_quantize = min(opts.steps, 8), 8, 5e-3, True
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    result = run(opts, started + opts.budget_s)
    result["total_s"] = time.monotonic() - started
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    curves, speed = result.get("loss_curves", {}), result.get("speedup_label_tokens_per_s")
    print(f"{result['processes']} processes vs 1: loss curves max rel diff {curves.get('max_rel_diff')} "
          f"(within {TOLERANCE}: {curves.get('within')}); label tokens/s x{speed}; "
          f"resumed: {result.get('resumed_vs_uninterrupted')}; errors: {[e['stage'] for e in result['errors']]}")
    return 0 if not result["errors"] and curves.get("within") else 1


if __name__ == "__main__":
    sys.exit(main())
