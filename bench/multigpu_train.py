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

--shard: a model whose 4-bit weights do not fit one card, sharded by FSDP2 (train.shard=fsdp) instead:

    python bench/multigpu_train.py --size 32b --shard --gib-per-gpu 23.5 --out $OUT/multigpu_sharded.json
    python bench/multigpu_train.py --smoke --shard --out /tmp/multigpu_sharded.json   # CPU: gloo, ~1 min

Random weights from the public Qwen2.5-32B config (~65 GB of bf16 safetensors, written once: a later call reuses a
complete copy, and its JSON says so and how long the first write took). Every process runs through this script's
launcher (--capped-train), which holds its CUDA allocator to --gib-per-gpu GiB of its LOCAL_RANK's card (default
23.5: torch.cuda.set_per_process_memory_fraction makes an H100 act as a 24 GB card; CUDA's context and NCCL's
buffers are outside the cap; without CUDA the cap is skipped, and recorded as such) and records its exit code, peak
memory and load time. Parts: (1) "one_card": one capped process, train.shard=none (one 24 GB card: expected to end
in samebox's "do not fit one GPU", exit 2; what happened is recorded, whatever it was); (2) "sharded": torchrun, N
capped processes, train.shard=fsdp, an explicit micro-batch budget (auto reads cudaMemGetInfo, which knows nothing
of the cap); (3) "interrupted": the sharded run stopped by SIGTERM and resumed. Where one_card trained (the CPU
smoke has no cap; a smaller --size), the sharded curve is compared with it. --parts runs a subset (e.g. only
"sharded" in a second call once the weights are written).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
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
LAUNCHER = "--capped-train"  # argv[1] of a process started through capped_train
CAP_ENV = "SAMEBOX_BENCH_GIB_PER_GPU"  # the launcher's cap (GiB per process); unset: no cap
RECORD_ENV = "SAMEBOX_BENCH_RANK_RECORDS"  # the folder the launcher writes rank<RANK>.json into
SHARD_PARTS = ("one_card", "sharded", "interrupted")
DDP_PARTS = ("one_gpu", "gpus", "interrupted")  # "gpus": torchrun over --nproc GPUs (its result key: N_gpus)
DID_NOT_FIT = "do not fit one GPU"  # trainer.model.load.weights_do_not_fit's message
SIZE_DEFAULTS = {  # under --size 32b, for what the command line leaves unset: a few steps that fit a GPU call
    "32b": {"steps": 6, "budget": 4096, "stop_after": 3, "part_timeout": 420.0},
}
DEFAULTS = {"steps": 40, "budget": 16384, "stop_after": 5, "part_timeout": 240.0}


def train_config(model_dir: Path, data: Path, run_dir: Path, opts: argparse.Namespace, shard: str | None = None
                 ) -> dict:
    config = {
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
    if shard is not None:
        config["train"]["shard"] = shard
    for setting in opts.set:  # --set section.key=value, the trainer's own dotted form (the value read as YAML)
        dotted, value = setting.split("=", 1)
        section, key = dotted.split(".", 1)
        config.setdefault(section, {})[key] = yaml.safe_load(value)
    return config


def launch(nproc: int, config: Path, log: Path, timeout: float, extra: tuple[str, ...] = (),
           stop_after_rows: int | None = None, run_dir: Path | None = None, capped: dict | None = None) -> dict:
    """One `samebox train`: plain for one process, torchrun otherwise; optionally SIGTERM once enough steps ran.
    ``capped`` (--shard): {"gib": cap or None, "records": folder, "threads": OMP_NUM_THREADS or None}: every process
    runs through this script's launcher, which caps its memory and writes its record into the folder."""
    if capped is None:
        train = ["-m", "builder", "train", str(config), "--no-preflight", *extra]
    else:
        train = [str(Path(__file__).resolve()), LAUNCHER, "train", str(config), "--no-preflight", *extra]
    if nproc == 1:
        argv = [sys.executable, *train]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *train]
    env = dict(os.environ, PYTHONPATH=tvr.child_pythonpath(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if capped is not None:
        env.pop(CAP_ENV, None)
        if capped["gib"] is not None:
            env[CAP_ENV] = str(capped["gib"])
        env[RECORD_ENV] = str(capped["records"])
        if capped["threads"] is not None:
            env["OMP_NUM_THREADS"] = str(capped["threads"])
        subprocess.run(["rm", "-rf", str(capped["records"])], check=True)
        Path(capped["records"]).mkdir(parents=True)
    started = time.perf_counter()
    signalled_at = None
    with open(log, "w") as fh:
        # Its own process group, so that a timeout takes torchrun's workers (and their GPU memory) with it.
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
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
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    out = {"argv": " ".join(argv[1:]), "exit": rc, "wall_s": time.perf_counter() - started,
           "output_tail": text[-2000:]}
    if signalled_at is not None:
        out["sigterm_after_step"] = signalled_at
    if capped is not None:
        out["error_line"] = error_line(text)
        out["oom_backoffs"] = text.count("out of memory: micro-batch budget now")  # trainer.loop.recipe's event
        out["ranks"] = rank_records(Path(capped["records"]), nproc)
        if capped["threads"] is not None:
            out["omp_num_threads"] = capped["threads"]
    return out


def error_line(text: str) -> str | None:
    """The first line of samebox's error (`samebox: error: ...`), or else of a Python traceback's exception."""
    lines = text.splitlines()
    for line in lines:
        if "samebox: error:" in line:
            return line[line.index("samebox: error:"):].strip()
    for line in lines:
        if "Error:" in line and not line.startswith((" ", "\t")):
            return line.strip()
    return None


def rank_records(folder: Path, nproc: int) -> list[dict]:
    """The launcher's record of each process (rank order); a process that left none (killed) is said so."""
    records = []
    for rank in range(nproc):
        path = folder / f"rank{rank}.json"
        records.append(json.loads(path.read_text()) if path.is_file()
                       else {"rank": rank, "error": "no record: the process was killed or never started"})
    return records


def capped_train(argv: list[str]) -> int:
    """The launcher of each --shard process (torchrun starts one per GPU): hold this process's CUDA allocator to
    $SAMEBOX_BENCH_GIB_PER_GPU GiB of its LOCAL_RANK's card, time the weights' load and the set-up, run
    `python -m builder ARGV` (runpy), then write this rank's record: the cap (or why there is none), the exit
    code, peak memory and those times."""
    import runpy

    import torch

    import trainer.loop.recipe as recipe

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    record: dict = {"rank": rank, "local_rank": local, "pid": os.getpid(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    gib, cuda = os.environ.get(CAP_ENV), torch.cuda.is_available()
    if not gib:
        record["memory_cap"] = "none: --gib-per-gpu 0"
    elif not cuda:
        record["memory_cap"] = "skipped: no CUDA device (the fraction caps CUDA's caching allocator only)"
    else:
        total = torch.cuda.get_device_properties(local).total_memory
        fraction = min(1.0, float(gib) * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, local)
        record["memory_cap"] = {"gib": float(gib), "fraction": fraction, "card_gib": total / 2**30, "device": local}
    seconds: dict = {}
    record["seconds"] = seconds
    # load: the weights read (quantized, on the GPU or, sharded, on the host) and wrapped in LoRA;
    # setup: the data, the load, the broadcast, the sharding, the optimizer: everything before the first step.
    timed(recipe, "setup_model", "load", seconds)
    timed(recipe.LoRAFinetuneRecipe, "setup", "setup", seconds)
    started = time.perf_counter()
    code: int = 1
    sys.argv = ["builder", *argv]
    try:
        runpy.run_module("builder", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        raise
    finally:
        seconds["process"] = time.perf_counter() - started
        record["exit"] = code
        if cuda:
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(local) / 2**30
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(local) / 2**30
        folder = os.environ.get(RECORD_ENV)
        if folder:
            Path(folder, f"rank{rank}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return code


def timed(owner: object, name: str, key: str, seconds: dict) -> None:
    """Wrap ``owner.name`` so that each call's wall time lands in ``seconds[key]`` (the last call's)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[key] = time.perf_counter() - started

    setattr(owner, name, wrapper)


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
    arm["time"] = where_time_went(rows, skip)
    return arm


def where_time_went(rows: list[dict], skip: int) -> dict:
    """Mean seconds per step after the first ``skip``, per rank: the step, the GPU's forward/backward (compute_s)
    and the gradient all-reduce (reduce_s, which holds the wait for the slowest rank; under --shard the collectives
    are inside compute_s instead); the rest of a step is host time. One process's rows carry its own; torchrun's
    carry every rank's (trainer.loop.recipe.RANK_TIMES)."""
    rows = rows[skip:] if len(rows) > skip else rows
    if not rows or "compute_s" not in rows[0]:
        return {}
    per_rank = {key: [[r[key]] for r in rows] for key in ("step_s", "compute_s", "reduce_s")}
    if "rank_compute_s" in rows[0]:
        per_rank = {key: [r[f"rank_{key}"] for r in rows] for key in per_rank}
    world = len(per_rank["compute_s"][0])
    mean = {key: [sum(step[k] for step in steps) / len(steps) for k in range(world)]
            for key, steps in per_rank.items()}
    host = [s - c - r for s, c, r in zip(mean["step_s"], mean["compute_s"], mean["reduce_s"], strict=True)]
    # The slowest rank of each step sets its pace: how much longer than the average rank it computed.
    spread = [max(step) - sum(step) / len(step) for step in per_rank["compute_s"]]
    return {"steps": len(rows), "step_s": mean["step_s"], "compute_s": mean["compute_s"],
            "reduce_s": mean["reduce_s"], "host_s": host, "slowest_rank_extra_compute_s": sum(spread) / len(spread)}


def scaling(one: dict, many: dict) -> dict:
    """Where N processes fall short of N times one: the per-step mean of one GPU's compute against the slowest
    rank's compute, and each rank's other time (all-reduce and wait, host)."""
    t1, tn = one.get("time"), many.get("time")
    if not t1 or not tn:
        return {}
    one_compute = t1["compute_s"][0]
    mean = sum(tn["compute_s"]) / len(tn["compute_s"])
    slowest = mean + tn["slowest_rank_extra_compute_s"]
    # work_ratio > 1: split N ways, the step's GPU work grew (costs per micro-batch: dequantizing the 4-bit
    # weights, launches; smaller matrix products); compute_bound_speedup: what the slowest rank's compute allows.
    return {"work_ratio": len(tn["compute_s"]) * mean / one_compute, "compute_bound_speedup": one_compute / slowest,
            "compute_s_one_gpu": one_compute, "compute_s_per_rank": tn["compute_s"],
            "compute_s_slowest_rank": slowest, "reduce_s_per_rank": tn["reduce_s"], "host_s_per_rank": tn["host_s"],
            "host_s_one_gpu": t1["host_s"][0], "step_s_one_gpu": t1["step_s"][0], "step_s_per_rank": tn["step_s"]}


def curve_diff(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n], strict=True)]
    worst = max(rel) if rel else None
    return {"steps": n, "max_rel_diff": worst, "tolerance": TOLERANCE,
            "within": worst is not None and worst <= TOLERANCE}


def prepare(opts: argparse.Namespace, work: Path, deadline: float) -> dict:
    """The random-weight model and the samples (bench/trainer_arms.py's prepare, in its own process), timed. A copy
    whose write was cut off (a call's time limit) has config.json but not the tokenizer, saved after the weights:
    it is removed and written again; a complete one is reused."""
    model_dir = work / f"model-{opts.size}"
    record: dict = {"model_dir": str(model_dir), "disk_free_gib_before": shutil.disk_usage(work).free / 2**30}
    if (model_dir / "config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        subprocess.run(["rm", "-rf", str(model_dir)], check=True)
        record["removed_incomplete_copy"] = True
    record["reused"] = (model_dir / "config.json").is_file()
    me = [sys.executable, str(BENCH / "trainer_vs_recipe.py")]
    started = time.perf_counter()
    try:
        prep = subprocess.run(me + ["--child", "prepare", "--size", opts.size, "--workdir", str(work), "--samples",
                                    str(opts.samples), "--median", str(opts.median), "--cap", str(opts.cap)],
                              cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=tvr.child_pythonpath()),
                              timeout=max(1.0, deadline - time.monotonic()))
        record["exit"], record["output"] = prep.returncode, (prep.stdout + prep.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        record["exit"], record["output"] = None, "timed out: the time budget (--budget-s) ran out; run it again"
    record["s"] = time.perf_counter() - started
    weights = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    record["safetensors_files"] = len(weights)
    record["safetensors_gib"] = sum(w.stat().st_size for w in weights) / 2**30
    return record


def omp_threads(opts: argparse.Namespace, nproc: int) -> int | None:
    """OMP_NUM_THREADS for a --shard launch: torchrun sets 1 where it is unset, and the sharded load quantizes the
    weights on the host; each of the N processes gets its share of the cores instead. None: the environment's."""
    if not opts.shard or nproc == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // nproc)


def host_ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return None


def run(opts: argparse.Namespace, deadline: float, save=lambda result: None) -> dict:
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
    if opts.shard:
        result["machine"]["host_ram_gib"] = host_ram_gib()
    if nproc < 2:
        result["errors"].append({"stage": "machine", "error": f"{nproc} GPU(s) visible; this needs 2 or more"})
        return result
    result["prepare"] = prep = prepare(opts, work, deadline)
    save(result)
    if prep["exit"] != 0:
        result["errors"].append({"stage": "prepare", "output": prep["output"]})
        return result
    model_dir, data = work / f"model-{opts.size}", work / f"data-{opts.size}.jsonl"
    if opts.shard:
        plan = {"one_card": (1, "none"), "sharded": (nproc, "fsdp"), "interrupted": (nproc, "fsdp")}
        parts = {name: plan[name] for name in SHARD_PARTS if name in opts.parts}
    else:
        plan = {"one_gpu": (1, None), "gpus": (nproc, None), "interrupted": (nproc, None)}
        parts = {(f"{nproc}_gpus" if name == "gpus" else name): plan[name] for name in DDP_PARTS
                 if name in opts.parts}
    for name, (n, shard) in parts.items():
        timeout = min(opts.part_timeout, deadline - time.monotonic())
        if timeout < 60:
            result["errors"].append({"stage": name, "error": "skipped: the time budget (--budget-s) ran out"})
            continue
        run_dir = work / f"run-{name}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        run_dir.mkdir(parents=True)
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump(train_config(model_dir, data, run_dir, opts, shard)))

        def capped(tag: str, n: int = n) -> dict | None:
            if not opts.shard:
                return None
            return {"gib": opts.gib_per_gpu, "records": work / f"ranks-{tag}", "threads": omp_threads(opts, n)}

        try:
            if name == "interrupted":
                first = launch(n, config, work / f"{name}-1.log", timeout / 2, stop_after_rows=opts.stop_after,
                               run_dir=run_dir, capped=capped(f"{name}-1"))
                second = launch(n, config, work / f"{name}-2.log", max(1.0, deadline - time.monotonic()),
                                ("--resume", "auto"), capped=capped(f"{name}-2"))
                result[name] = {"launches": [first, second], **measured(run_dir, opts.warmup_steps),
                                "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
            else:
                result[name] = {"launch": launch(n, config, work / f"{name}.log", timeout, capped=capped(name)),
                                **measured(run_dir, opts.warmup_steps)}
            if opts.shard:
                result[name].update(per_rank(result[name], run_dir))
        except Exception as e:  # noqa: BLE001 - a broken part must not lose the others
            result["errors"].append({"stage": name, "error": repr(e)})
        save(result)
    if opts.shard:
        compare_sharded(result, opts)
        return result
    one, many = result.get("one_gpu"), result.get(f"{nproc}_gpus")
    if one and many:
        result["loss_curves"] = curve_diff(many["losses"], one["losses"])
        s1, sn = one["steady"]["label_tokens_per_s"], many["steady"]["label_tokens_per_s"]
        result["speedup_label_tokens_per_s"] = sn / s1 if s1 and sn else None
        result["same_label_tokens"] = one["label_tokens"] == many["label_tokens"]
        result["scaling"] = scaling(one, many)
    if many and result.get("interrupted"):
        result["resumed_vs_uninterrupted"] = curve_diff(result["interrupted"]["losses"], many["losses"])
    return result


def per_rank(part: dict, run_dir: Path) -> dict:
    """--shard: each step's peak memory of rank 0 (metrics.jsonl) and each rank's peak memory and load time (the
    launcher's records; the last launch's for the interrupted part)."""
    last = part["launches"][-1] if "launches" in part else part["launch"]
    ranks = last.get("ranks", [])
    return {"mem_gib": [r.get("mem_gib") for r in rows_of(run_dir)],
            "peak_mem_gib_per_rank": [r.get("peak_mem_gib") for r in ranks],
            "peak_reserved_gib_per_rank": [r.get("peak_reserved_gib") for r in ranks],
            "load_s_per_rank": [r.get("seconds", {}).get("load") for r in ranks],
            "setup_s_per_rank": [r.get("seconds", {}).get("setup") for r in ranks],
            "memory_cap": [r.get("memory_cap") for r in ranks]}


def compare_sharded(result: dict, opts: argparse.Namespace) -> None:
    """--shard: what one capped card did, whether the sharded run trained every step, and its curve against the
    one-process curve where there is one (the CPU smoke; a model that fits one card)."""
    one, many, resumed = result.get("one_card"), result.get("sharded"), result.get("interrupted")
    verdict: dict = {}
    if one:
        line = one["launch"].get("error_line")
        verdict["one_card"] = {"exit": one["launch"]["exit"], "error_line": line,
                               "did_not_fit": bool(line and DID_NOT_FIT in line), "steps_trained": len(one["losses"]),
                               "oom_backoffs": one["launch"]["oom_backoffs"],
                               "memory_cap": one["memory_cap"][0] if one["memory_cap"] else None}
    if many:
        verdict["sharded"] = {"exit": many["launch"]["exit"], "steps_trained": len(many["losses"]),
                              "trained_every_step": many["launch"]["exit"] == 0 and len(many["losses"]) == opts.steps}
    result["verdict"] = verdict
    if one and many and one["losses"] and many["losses"]:
        result["loss_curves"] = curve_diff(many["losses"], one["losses"])
        s1, sn = one["steady"]["label_tokens_per_s"], many["steady"]["label_tokens_per_s"]
        result["speedup_label_tokens_per_s"] = sn / s1 if s1 and sn else None
        result["same_label_tokens"] = one["label_tokens"] == many["label_tokens"][: len(one["label_tokens"])]
    if many and resumed and many["losses"]:
        result["resumed_vs_uninterrupted"] = curve_diff(resumed["losses"], many["losses"])


def shard_ok(result: dict) -> bool:
    """--shard's exit status: no part broke, the sharded run trained every step, and one card either could not hold
    the model or, where it trained, gave the same curve."""
    verdict = result.get("verdict", {})
    sharded_ok = verdict.get("sharded", {}).get("trained_every_step", False)
    one = verdict.get("one_card")
    one_ok = one is None or one["did_not_fit"] or result.get("loss_curves", {}).get("within", False)
    resumed = result.get("resumed_vs_uninterrupted")
    return not result["errors"] and sharded_ok and one_ok and (resumed is None or resumed["within"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [LAUNCHER]:  # one process of a --shard part (see capped_train)
        return capped_train(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--size", default="7b", choices=sorted(tvr.QWEN), help="public Qwen2.5 config to copy")
    p.add_argument("--nproc", type=int, default=None, help="processes for the multi-GPU parts (default: all GPUs)")
    p.add_argument("--steps", type=int, default=None, help="default 40; 6 for --size 32b")
    p.add_argument("--samples-per-step", type=int, default=32, help="global: split over the processes")
    p.add_argument("--budget", type=int, default=None,
                   help="micro-batch token budget per process (default 16384; 4096 for --size 32b)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--median", type=int, default=250)
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--stop-after", type=int, default=None,
                   help="SIGTERM the interrupted part after this many steps (default 5; 3 for --size 32b)")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the throughput")
    p.add_argument("--part-timeout", type=float, default=None, help="seconds per part (default 240; 420 for 32b)")
    p.add_argument("--budget-s", type=float, default=540, help="start no part after this many seconds")
    p.add_argument("--no-quantize", action="store_true", help="bf16 LoRA instead of NF4 (no bitsandbytes)")
    p.add_argument("--workdir", default="/tmp/samebox-multigpu-train")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny config, 2 gloo processes: checks the script")
    p.add_argument("--shard", action="store_true",
                   help="parts one_card (train.shard=none, one process), sharded and interrupted (train.shard=fsdp)")
    p.add_argument("--gib-per-gpu", type=float, default=None,
                   help="--shard: hold each process to this many GiB of its GPU (default 23.5: a 24 GB card; 0: "
                        "no cap)")
    p.add_argument("--parts", default=None,
                   help=f"which parts, comma-separated: of {','.join(DDP_PARTS)} (default all), or with --shard of "
                        f"{','.join(SHARD_PARTS)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a train config setting for every part (repeatable), e.g. train.offload_activations=false")
    opts = p.parse_args(argv)
    allowed = SHARD_PARTS if opts.shard else DDP_PARTS
    opts.parts = [part.strip() for part in (opts.parts or ",".join(allowed)).split(",") if part.strip()]
    if not opts.shard and opts.gib_per_gpu is not None:
        p.error("--gib-per-gpu goes with --shard")
    if set(opts.parts) - set(allowed) or not opts.parts:
        p.error(f"--parts: a comma-separated subset of {','.join(allowed)}")
    for setting in opts.set:
        dotted = setting.split("=", 1)[0]
        if "=" not in setting or dotted.count(".") != 1:
            p.error(f"--set {setting!r}: write SECTION.KEY=VALUE, e.g. train.offload_activations=false")
        if dotted == "train.shard":
            p.error("--set train.shard: each part sets its own (--shard runs the train.shard=fsdp parts)")
    if opts.shard and opts.gib_per_gpu is None:
        opts.gib_per_gpu = 23.5
    opts.gib_per_gpu = opts.gib_per_gpu or None  # 0: no cap
    for key, value in {**DEFAULTS, **SIZE_DEFAULTS.get(opts.size, {})}.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.smoke:
        opts.size, opts.samples, opts.median, opts.cap, opts.budget = "smoke", 128, 30, 128, 1024
        opts.steps, opts.samples_per_step, opts.lr, opts.no_quantize = min(opts.steps, 8), 8, 5e-3, True
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def save(partial: dict) -> None:  # after each stage: a call cut off by its time limit still leaves a result
        out.write_text(json.dumps({**partial, "total_s": time.monotonic() - started, "finished": False},
                                  indent=2, sort_keys=True))

    result = run(opts, started + opts.budget_s, save if opts.shard else (lambda partial: None))
    result["total_s"] = time.monotonic() - started
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    curves, speed = result.get("loss_curves", {}), result.get("speedup_label_tokens_per_s")
    if opts.shard:
        print(f"sharded over {result['processes']} processes: {result.get('verdict')}; loss curves vs one card "
              f"{curves.get('max_rel_diff')} (within {TOLERANCE}: {curves.get('within')}); "
              f"resumed: {result.get('resumed_vs_uninterrupted')}; errors: {[e['stage'] for e in result['errors']]}")
        return 0 if shard_ok(result) else 1
    print(f"{result['processes']} processes vs 1: loss curves max rel diff {curves.get('max_rel_diff')} "
          f"(within {TOLERANCE}: {curves.get('within')}); label tokens/s x{speed}; "
          f"resumed: {result.get('resumed_vs_uninterrupted')}; errors: {[e['stage'] for e in result['errors']]}")
    return 0 if not result["errors"] and curves.get("within") else 1


if __name__ == "__main__":
    sys.exit(main())
