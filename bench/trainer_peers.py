"""Benchmark: `samebox train` side by side with its peers (the seed recipe's settings, HF Trainer padding-free,
unsloth), on random-weight Qwen2.5 models made from the public configs, with the shipped configs' LoRA settings.

Every arm gets the same token ids and labels: each data mix is tokenized once by samebox's own code and the peers
train on those ids (HF labels converted from samebox's shifted targets; the label-token counts are checked), 16
samples per optimizer step in file order, with the config's lr, cosine schedule without warm-up, and clipping. Each
arm is its own process (its memory is its own; unsloth is imported before transformers); a failing arm keeps the
others' results, the JSON is rewritten after every arm, and --deadline stops starting arms in time. With two GPUs
the model rows run concurrently, every arm of one row on the same GPU.

  bash bench/peers_gpu.sh --gpus 0,1                      # GPU: installs carried wheels, then this script
  python bench/trainer_peers.py --out R.json --only 7b,chat --gpus 0   # one model and mix, all arms
  python bench/trainer_peers.py --out R.json --curve      # 50-step loss curves, samebox vs HF padding-free
  python bench/trainer_peers.py --out R.json --merge A.json B.json --merge-only   # combine split runs
  python bench/trainer_peers.py --smoke --out /tmp/peers_smoke.json     # CPU, tiny model, ~1-2 min

Start-up: each arm's first mix says how many seconds from its process's start it took to import its libraries, to
load (quantize, wrap in LoRA) the weights, to finish step 1 and to save a first checkpoint (peer_report.startup_table).
samebox runs with --no-preflight unless --startup-preflight is given: then its start includes the preflight self-test
as a user's `samebox train` runs it (beside the imports, done before the weights load, so the steps' throughput is
the same).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from peer_arms import versions as package_versions
from peer_data import write_mix
from peer_report import ARM_ORDER, compare_row, curve_check, lora_flops, markdown_table, merge_results, summarize_arm
from trainer_arms import SAMPLES_PER_STEP
from trainer_vs_recipe import peak_tflops, read_samebox

SAMEBOX_CHECKPOINT_HOLDS = "adapter, optimizer, scheduler, RNG states and a sha256 manifest, fsynced"

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CONFIGS = {"7b": "configs/qwen2.5-7b-qlora-24gb.yaml", "1.5b": "configs/qwen2.5-1.5b-lora.yaml",
           "smoke": "configs/qwen2.5-1.5b-lora.yaml"}
MIXES = ("short", "chat")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SMOKE_OVERRIDES = ["model.dtype=fp32"]  # the CPU smoke run: every arm in fp32, so step-1 losses agree closely


# ----- the machine ---------------------------------------------------------------------------------------------
def gpus_found() -> list[dict]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    return [{"index": r[0], "name": r[1], "memory": r[2], "driver": r[3]} for r in rows if len(r) == 4]


def machine() -> dict:
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"gpus": gpus_found(), "cpus": os.cpu_count(), "ram_gib": mem, "platform": platform.platform()}


def versions() -> dict:
    """The arms' package versions (as each arm sees them: PYTHONPATH included) and samebox's commit."""
    found: dict[str, Any] = dict(package_versions())
    commit = os.environ.get("SAMEBOX_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            commit = None
    found["samebox_commit"] = commit
    return found


# ----- child processes -----------------------------------------------------------------------------------------
def run_child(argv: list[str], log: Path, timeout: float, env_extra: dict[str, str], cwd: Path = REPO
              ) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, wall seconds, output tail); on timeout its whole process group is killed."""
    path = os.pathsep.join([str(REPO), str(BENCH)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                      else []))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", **env_extra)
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - started, log.read_text(errors="replace")[-3000:]


def last_line(output: str, rc: int | None) -> str:
    """What a failed child said last (its exception, usually), for the table's notes."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return ("timed out: " if rc is None else f"exit {rc}: ") + (lines[-1][:300] if lines else "no output")


def samebox_startup(summary: dict) -> dict | None:
    """samebox's start-up from its summary.json, with the first checkpoint as the peers report it: step 1's mark
    plus the seconds the trainer timed its first save (its checkpoint after the last step: a checkpoint at step 1
    would put a save between the timed steps)."""
    found = summary.get("startup")
    if not found or "step_1" not in found.get("seconds_to", {}):
        return found
    startup = {**found, "seconds_to": dict(found["seconds_to"]), "stage_seconds": dict(found["stage_seconds"]),
               "checkpoint_holds": SAMEBOX_CHECKPOINT_HOLDS}
    save_s = found.get("first_save_s")
    if save_s is None:
        startup["checkpoint_note"] = "the run saved no checkpoint"
        return startup
    startup["seconds_to"]["checkpoint"] = round(startup["seconds_to"]["step_1"] + save_s, 2)
    startup["stage_seconds"]["checkpoint"] = round(save_s, 2)
    return startup


class Bench:
    """One run: the selected models x mixes x arms, results kept in ``self.result`` and rewritten as they come."""

    def __init__(self, opts: argparse.Namespace, models: list[str], mixes: list[str], arms: list[str]) -> None:
        self.opts, self.models, self.mixes, self.arms = opts, models, mixes, arms
        self.work = Path(opts.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + opts.deadline
        self.lock = threading.Lock()
        machine_info = machine()
        self.gpu_info = {g["index"]: g for g in machine_info["gpus"]}
        self.cuda = bool(self.gpu_info) and not opts.smoke
        if opts.gpus == "auto":  # every GPU there is, at most one per model row
            opts.gpus = ",".join(list(self.gpu_info)[:max(len(models), 2 if opts.curve else 1)]) if self.cuda else ""
        self.gpus = [g.strip() for g in opts.gpus.split(",")] if opts.gpus else [None]
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name] + sys.argv), "machine": machine_info,
            "versions": versions(), "mode": "curve" if opts.curve else "smoke" if opts.smoke else "rows",
            "settings": {"steps": opts.steps, "recipe_steps": opts.recipe_steps,
                         "warmup_steps": opts.warmup_steps, "samples_per_step": SAMPLES_PER_STEP,
                         "deadline_s": opts.deadline, "arm_timeout_s": opts.arm_timeout, "gpus": opts.gpus,
                         "startup_preflight": opts.startup_preflight,
                         "configs": {m: CONFIGS[m] for m in models}},
            "note": ("Throughput over the steps after the first warmup_steps (synchronised step times; HF arms: "
                     "from on_step_begin to on_step_end, after the step's batches are collated). end_to_end_s: "
                     "samebox = its CLI process (import, load, tokenization cache, steps, checkpoint); HF-based "
                     "arms load once and train both mixes in one process, so theirs = process start to model ready "
                     "+ that mix's training (process_s: the whole process, both mixes). Peak memory "
                     "(peak_allocated_gib, the ratios): every arm's over its steps alone, the allocator's peak reset "
                     "after loading (samebox: its summary's memory_gib.train, the largest of its steps' phases); "
                     "load_peak_allocated_gib: every arm's from its start to its model ready; samebox's whole "
                     "process in process_peak_allocated_gib, its phases in memory_gib. The HF "
                     "arms seed torch with train.seed before loading, as samebox does, so LoRA A starts the same. "
                     "startup: seconds since the arm's process started, in the first mix's row only for the HF "
                     "arms (their process trains every mix); checkpoint = step_1 + the seconds of one save after "
                     "the mix's last step (samebox: its final checkpoint, as its trainer timed it; HF arms: the LoRA "
                     "adapter saved once after training), so no save sits inside the timed steps."),
            "rows": [],
        }
        self.rows: dict[tuple[str, str], dict] = {}
        self.setups: dict[str, dict | None] = {}
        self.model_locks: dict[str, threading.Lock] = {}

    # ----- bookkeeping ----------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, model: str, mix: str) -> dict:
        key = (model, mix)
        if key not in self.rows:
            self.rows[key] = {"model": model, "mix": mix, "config": CONFIGS[model], "arms": {}, "errors": []}
            self.result["rows"].append(self.rows[key])
        return self.rows[key]

    def record(self, model: str, mix: str, arm: str, value: dict | None = None, error: dict | None = None) -> None:
        with self.lock:
            row = self.row(model, mix)
            if value is not None:
                row["arms"][arm] = value
            if error is not None:
                if arm in ARM_ORDER:
                    row["arms"].setdefault(arm, {"failed": error.get("error", "failed")})
                row["errors"].append({"arm": arm, **error})
            compare_row(row)
            self.write()

    def write(self) -> None:
        out = Path(self.opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, sort_keys=True))
        tmp.rename(out)

    # ----- one model row ------------------------------------------------------------------------------------
    def steps_for(self, arm: str) -> int:
        return min(self.opts.recipe_steps, self.opts.steps) if arm == "recipe" else self.opts.steps

    def data_file(self, mix: str) -> Path:
        n = self.opts.steps * SAMPLES_PER_STEP
        return write_mix(mix, n, self.work / f"data-{mix}-{n}{'-smoke' if self.opts.smoke else ''}.jsonl",
                         seed=1 if mix == "short" else 2, smoke=self.opts.smoke)

    def config_overrides(self, model: str, mix: str) -> list[str]:
        return [f"model.name={self.work / f'model-{model}'}", f"data.path={self.data_file(mix)}",
                f"data.cache_dir={self.work / 'cache'}"] + (SMOKE_OVERRIDES if self.opts.smoke else [])

    def setup(self, model: str, env: dict[str, str]) -> dict | None:
        """Once per model, whichever thread asks first: the model made, the mixes tokenized, the config read."""
        with self.lock:
            model_lock = self.model_locks.setdefault(model, threading.Lock())
        with model_lock:
            if model in self.setups:
                return self.setups[model]
            prepared = self.prepare(model, env)
            if prepared is None:
                self.setups[model] = None
                return None
            from trainer.config import load_config

            cfg = load_config(REPO / CONFIGS[model], self.config_overrides(model, self.mixes[0]))
            if cfg.train.samples_per_step != SAMPLES_PER_STEP:
                raise SystemExit(f"{CONFIGS[model]}: train.samples_per_step={cfg.train.samples_per_step}; the "
                                 f"peers use {SAMPLES_PER_STEP}")
            lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                    "targets": cfg.lora.targets}
            size = "smoke" if self.opts.smoke else model
            flops = {mix: [lora_flops(size, s["lengths"], s["labels"], lora["r"], lora["targets"])
                           for s in prepared[mix]["per_step"]] for mix in self.mixes}
            for mix in self.mixes:
                with self.lock:
                    row = self.row(model, mix)
                    row["label_tokens_expected"] = [sum(s["labels"]) for s in prepared[mix]["per_step"]]
                    row["lora"] = lora
            self.setups[model] = {"cfg": cfg, "lora": lora, "prepared": prepared, "flops": flops}
            return self.setups[model]

    def run_model(self, model: str, gpu: str | None, arms: list[str]) -> None:
        env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        gpu_desc = self.gpu_info.get(gpu, {}).get("name") if gpu is not None else None
        for mix in self.mixes:
            with self.lock:
                self.row(model, mix).update({"gpu": gpu, "gpu_name": gpu_desc})
        setup = self.setup(model, env)
        if setup is None:
            return
        peak = peak_tflops(gpu_desc, self.opts.peak_tflops)
        for arm in arms:
            if arm == "unsloth" and not self.cuda and importlib.util.find_spec("unsloth") is None:
                # unsloth 2026.10.9 falls back to CPU training when it is installed: then the smoke run tries it.
                for mix in self.mixes:
                    self.record(model, mix, arm, {"skipped": "needs a CUDA GPU"})
                continue
            if self.remaining() < self.opts.min_arm_s:
                for mix in self.mixes:
                    self.record(model, mix, arm, error={"stage": arm, "error": "skipped: --deadline reached"})
                continue
            if arm == "samebox":
                for mix in self.mixes:
                    self.run_samebox(model, mix, env, setup["flops"][mix], peak, gpu)
            else:
                self.run_peer(model, arm, setup, env, peak, gpu)

    def prepare(self, model: str, env: dict[str, str]) -> dict | None:
        """Make the model (once) and tokenize each mix with samebox's code; per mix, each step's sample lengths."""
        plan = {"size": "smoke" if self.opts.smoke else model, "model_dir": str(self.work / f"model-{model}"),
                "config": str(REPO / CONFIGS[model]), "result": str(self.work / f"prepare-{model}.json"),
                "mixes": [{"mix": mix, "overrides": self.config_overrides(model, mix),
                           "tokens": str(self.tokens_file(model, mix))} for mix in self.mixes]}
        plan_file = self.work / f"prepare-{model}.plan.json"
        plan_file.write_text(json.dumps(plan))
        rc, wall, tail = run_child([sys.executable, str(BENCH / "peer_data.py"), str(plan_file)],
                                   self.work / f"prepare-{model}.log", max(1.0, self.remaining()), env)
        if rc != 0:
            for mix in self.mixes:
                self.record(model, mix, "prepare", error={"stage": "prepare", "exit": rc, "output": tail,
                                                          "error": last_line(tail, rc)})
            return None
        report = json.loads(Path(plan["result"]).read_text())
        prepared = {}
        for mix in self.mixes:
            blob = json.loads(self.tokens_file(model, mix).read_text())
            per_step = [{"lengths": blob["lengths"][s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP],
                         "labels": blob["label_tokens"][s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP]}
                        for s in range(self.opts.steps)]
            prepared[mix] = {"per_step": per_step, "pad_id": blob["pad_id"], **report[mix]}
            with self.lock:
                self.row(model, mix).update({"prepare_s": wall, "data": report[mix]})
        return prepared

    def tokens_file(self, model: str, mix: str) -> Path:
        return self.work / f"tokens-{model}-{mix}-{self.opts.steps * SAMPLES_PER_STEP}.json"

    def samebox_argv(self, model: str, mix: str, run_dir: Path) -> list[str]:
        """One checkpoint, at the last step (outside every step's time); the preflight only with
        --startup-preflight."""
        return [sys.executable, "-m", "builder", "train", str(REPO / CONFIGS[model]),
                *self.config_overrides(model, mix), "data.shuffle=false", f"train.max_steps={self.opts.steps}",
                "train.warmup_ratio=0", f"output.dir={run_dir}", "output.save_every_steps=100000",
                "output.tensorboard=false"] + ([] if self.opts.startup_preflight else ["--no-preflight"])

    def run_samebox(self, model: str, mix: str, env: dict[str, str], flops: list[float], peak: float | None,
                    gpu: str | None) -> None:
        run_dir = self.work / "runs" / f"samebox-{model}-{mix}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        argv = self.samebox_argv(model, mix, run_dir)
        if self.remaining() < self.opts.min_arm_s:
            self.record(model, mix, "samebox", error={"stage": "samebox", "error": "skipped: --deadline reached"})
            return
        rc, wall, tail = run_child(argv, self.work / f"samebox-{model}-{mix}.log",
                                   min(self.opts.arm_timeout, self.remaining()), env)
        try:
            raw = read_samebox(run_dir)
        except (OSError, ValueError, KeyError) as e:
            self.record(model, mix, "samebox", error={"stage": "samebox", "exit": rc, "wall_s": wall,
                                                      "error": f"no result ({e}); {last_line(tail, rc)}",
                                                      "output": tail})
            return
        memory = raw["summary"].get("memory_gib") or {}
        # The steps' window, as the HF arms measure theirs (their peak is reset once the model is loaded).
        raw.update(end_to_end_s=wall, peak_allocated_gib=memory.get("train", raw.get("peak_mem_gib")), gpu=gpu,
                   process_peak_allocated_gib=raw.get("peak_mem_gib"), load_peak_allocated_gib=memory.get("load"),
                   memory_gib=memory or None,
                   startup=samebox_startup(raw["summary"]),
                   settings={k: raw["summary"].get(k) for k in ("attention", "packing", "gradient_checkpointing",
                                                                "micro_batch_tokens")})
        self.record(model, mix, "samebox", summarize_arm(raw, flops, peak, self.opts.warmup_steps),
                    error=None if rc == 0 else {"stage": "samebox", "exit": rc, "output": tail,
                                                "error": last_line(tail, rc)})

    def run_peer(self, model: str, arm: str, setup: dict, env: dict[str, str], peak: float | None,
                 gpu: str | None) -> None:
        """One process per arm and model: load once, then every mix (restoring the initial LoRA weights)."""
        cfg, lora, prepared, flops = setup["cfg"], setup["lora"], setup["prepared"], setup["flops"]
        steps = self.steps_for(arm)
        result_file = self.work / f"{arm}-{model}.json"
        result_file.unlink(missing_ok=True)
        plan = {"arm": arm, "size": model, "model_dir": str(self.work / f"model-{model}"),
                "quantize": cfg.model.quantization == "nf4" and self.cuda, "dtype": TORCH_DTYPES[cfg.model.dtype],
                "max_length": cfg.data.max_length, "lora": lora, "pad_id": prepared[self.mixes[0]]["pad_id"],
                "train": {"lr": cfg.train.lr, "max_grad_norm": cfg.train.max_grad_norm, "seed": cfg.train.seed,
                          "weight_decay": cfg.train.weight_decay, "min_lr_ratio": cfg.train.min_lr_ratio},
                "result": str(result_file),
                "mixes": [{"mix": mix, "tokens": str(self.tokens_file(model, mix)), "steps": steps,
                           "result": str(result_file)} for mix in self.mixes]}
        plan_file = self.work / f"{arm}-{model}.plan.json"
        plan_file.write_text(json.dumps(plan))
        # unsloth writes its compiled cache into the working directory: keep it out of the repo.
        cwd = self.work if arm == "unsloth" else REPO
        extra = {"UNSLOTH_DISABLE_STATISTICS": "1"} if arm == "unsloth" else {}
        rc, wall, tail = run_child([sys.executable, str(BENCH / "peer_arms.py"), str(plan_file)],
                                   self.work / f"{arm}-{model}.log", min(self.opts.arm_timeout, self.remaining()),
                                   {**env, **extra}, cwd=cwd)
        try:
            report = json.loads(result_file.read_text())
        except (OSError, ValueError):
            report = {"mixes": {}, "errors": []}
        for mix in self.mixes:
            raw = report["mixes"].get(mix)
            # A failure before training (import, load) is every mix's; a training failure is its mix's.
            errors = [e for e in report.get("errors", []) if not e["stage"].startswith("train ")
                      or e["stage"] == f"train {mix}"]
            if raw is None and not errors:
                errors = [{"stage": arm, "error": "timed out" if rc is None else f"exit {rc}, no result",
                           "wall_s": wall}]
            if raw is not None:
                raw.update(settings=report.get("settings"), notes=report.get("notes"), gpu=gpu, process_s=wall,
                           load_peak_allocated_gib=report.get("load_peak_allocated_gib"))
                if mix == self.mixes[0]:  # the process's start: its first mix's step 1
                    raw["startup"] = report.get("startup")
                self.record(model, mix, arm, summarize_arm(raw, flops[mix], peak, self.opts.warmup_steps))
            for e in errors:
                self.record(model, mix, arm, error={**e, "output": tail})

    # ----- all rows -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        for mix in self.mixes:
            self.data_file(mix)
        jobs: dict[str | None, list[tuple[str, list[str]]]] = {}
        if self.opts.curve and len(self.gpus) > 1:
            # Only losses are compared: each arm on a GPU of its own, side by side.
            for gpu, arm in zip(self.gpus, self.arms, strict=False):
                jobs[gpu] = [(self.models[0], [arm])]
        else:
            for i, model in enumerate(self.models):
                jobs.setdefault(self.gpus[i % len(self.gpus)], []).append((model, self.arms))

        def worker(gpu: str | None, todo: list[tuple[str, list[str]]]) -> None:
            for model, arms in todo:
                try:
                    self.run_model(model, gpu, arms)
                except Exception:  # noqa: BLE001 - a broken model row must not lose the others
                    for mix in self.mixes:
                        self.record(model, mix, "bench", error={"stage": "bench",
                                                                "error": traceback.format_exc()[-3000:]})

        threads = [threading.Thread(target=worker, args=(gpu, todo)) for gpu, todo in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.result["total_s"] = time.monotonic() - started
        self.result["runs"] = [self.result["command"]]
        if self.opts.curve:
            row = self.rows.get((self.models[0], self.mixes[0]), {"arms": {}})
            a, b = (row["arms"].get(n, {}).get("losses", []) for n in ("samebox", "hf_padding_free"))
            self.result["curve"] = {"model": self.models[0], "mix": self.mixes[0], "samebox": a,
                                    "hf_padding_free": b, **curve_check(a, b)}
        with self.lock:
            self.write()
        return self.result


def selection(opts: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """--only 7b,chat,unsloth,samebox: each name picks within its own kind (model, mix, arm); a kind not named
    keeps all of it. --curve: one model and mix, samebox and HF padding-free."""
    if opts.curve:
        return ["smoke" if opts.smoke else opts.curve_model], [opts.curve_mix], ["samebox", "hf_padding_free"]
    models = ["smoke"] if opts.smoke else ["7b", "1.5b"]
    arms = list(ARM_ORDER)
    names = [n.strip() for n in (opts.only or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in models + list(MIXES) + arms]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; choose from {models + list(MIXES) + arms}")
    pick = lambda kind: [n for n in kind if n in names] or list(kind)  # noqa: E731
    return pick(models), pick(MIXES), pick(arms)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results" / "trainer_peers.json"), help="JSON result path")
    p.add_argument("--only", help="comma list of models (7b, 1.5b), mixes (short, chat), arms "
                                  "(samebox, unsloth, hf_padding_free, recipe)")
    p.add_argument("--gpus", default="auto", help="GPU indices (default: all, one per model row); with two, the "
                                                   "model rows run concurrently, each row's arms on its GPU")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (16 samples each)")
    p.add_argument("--recipe-steps", type=int, default=4, help="steps for the slow recipe arm")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the throughput")
    p.add_argument("--deadline", type=float, default=540, help="seconds from start after which no arm starts")
    p.add_argument("--arm-timeout", type=float, default=330, help="seconds one arm process may run")
    p.add_argument("--min-arm-s", type=float, default=45, help="an arm starts only with this much time left")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--workdir", default="/tmp/samebox-peers")
    p.add_argument("--curve", action="store_true", help="samebox vs hf_padding_free loss curves instead of rows")
    p.add_argument("--curve-steps", type=int, default=50)
    p.add_argument("--curve-model", default="7b", choices=("7b", "1.5b"))
    p.add_argument("--curve-mix", default="chat", choices=MIXES)
    p.add_argument("--merge", nargs="+", default=[], help="earlier result files: their rows are kept unless rerun")
    p.add_argument("--merge-only", action="store_true", help="only merge --merge files into --out")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks the script works")
    p.add_argument("--startup-preflight", action="store_true",
                   help="samebox runs with its preflight self-test (as `samebox train` does); default --no-preflight")
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.steps, opts.recipe_steps, opts.warmup_steps, opts.gpus = min(opts.steps, 3), min(opts.steps, 3), 1, ""
    if opts.curve:
        opts.steps = opts.curve_steps
        opts.arm_timeout = max(opts.arm_timeout, opts.deadline)  # one long arm per GPU: only the deadline binds
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    sys.path.insert(0, str(REPO))  # trainer.config, to read the shipped configs' LoRA and train settings
    merged: dict = {}
    for path in opts.merge:
        merged = merge_results(merged, json.loads(Path(path).read_text()))
    if opts.merge_only:
        result = merged
    else:
        models, mixes, arms = selection(opts)
        result = Bench(opts, models, mixes, arms).run()
        if merged:
            result = merge_results(merged, result)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(markdown_table(result))
    return 0 if all(not r.get("errors") for r in result.get("rows", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
