"""The peer benchmark's arms built on the HF Trainer (bench/trainer_peers.py runs each in its own process): the
seed recipe's settings, HF padding-free, and unsloth. Each trains on exactly the token ids and labels samebox would
(bench/peer_data.py made them), 16 samples per optimizer step in file order.

  python bench/peer_arms.py PLAN.json     # one arm: load once, then every mix of the plan

unsloth must be imported before transformers: this module imports neither at the top, and the unsloth arm imports
unsloth first thing. The result file is rewritten after every mix, so a crash or a timeout in a later mix keeps the
earlier ones; a failure is written with the stage it happened in and the versions found. Each arm also says where
its start went (PEER_STAGES), in seconds since its process started, as `samebox train` does.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer_data import IGNORE
from trainer_arms import SAMPLES_PER_STEP, step_timer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEER_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "flash-attn", "unsloth",
                 "unsloth_zoo", "trl", "datasets", "torchao", "triton", "xformers", "cut_cross_entropy")
# (mark, what the seconds up to it went to), as trainer/loop/startup.py's STAGES: step 1 is the first mix's.
PEER_STAGES = (("imports", "interpreter and libraries"), ("weights", "weights, quantization, LoRA"),
               ("step_1", "step 1"), ("checkpoint", "LoRA adapter saved"))
CHECKPOINT_HOLDS = "the LoRA adapter (model.save_pretrained)"


# ----- the HF-Trainer-based arms (child process) ---------------------------------------------------------------
def import_hf() -> None:
    """What the HF-Trainer-based arms load and train with, transformers' lazy modules included."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401


def import_unsloth() -> None:
    """unsloth first (it patches transformers and peft as it is imported), then the Trainer it patched."""
    import unsloth  # noqa: F401 - before transformers, as unsloth requires
    from transformers import Trainer  # noqa: F401
    from unsloth import FastLanguageModel  # noqa: F401


@dataclass
class Loaded:
    model: Any
    settings: dict[str, Any]
    trainer_args: dict[str, Any]  # TrainingArguments for this arm (lr, schedule, clipping added by the runner)
    collator: Callable[[list[dict]], dict]
    batch_size: int  # samples per micro-batch; SAMPLES_PER_STEP / batch_size micro-batches per step
    notes: list[str] = field(default_factory=list)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_attention(cuda: bool) -> str:
    import importlib.util

    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def lora_targets(lora: dict) -> list[str] | str:
    return lora["targets"] if isinstance(lora["targets"], list) else "all-linear"


def peft_lora(lora: dict) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora_targets(lora), task_type="CAUSAL_LM")


def seed_like_samebox(plan: dict) -> None:
    """samebox seeds torch with train.seed before loading: the LoRA A matrices then start from the same draws."""
    import torch

    torch.manual_seed(plan["train"]["seed"])


def padding_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right padding to the longest row with an attention mask, as the recipe's tokenizer output has."""
    import torch

    def collate(features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id)
        labels = torch.full((len(features), width), IGNORE)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


def load_recipe(plan: dict) -> Loaded:
    """The seed recipe's settings: load_in_4bit defaults (fp4, fp32 compute), fp16, batch 1 x 16 accumulation,
    no checkpointing, flash_attention_2 when installed; the LoRA settings of the samebox config."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = cuda_available()
    attention = pick_attention(cuda)
    seed_like_samebox(plan)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True)} if plan["quantize"] else {}
    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], attn_implementation=attention,
                                                 device_map="auto" if cuda else None, **kwargs)
    loaded_dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))
    model = get_peft_model(model, peft_lora(plan["lora"]))
    settings = {"attention": attention, "quantization": "bnb 4-bit defaults" if plan["quantize"] else "none",
                "weights_dtype": loaded_dtype, "precision": "fp16 autocast" if cuda else "fp32",
                "micro_batch": "1 x 16 accumulation", "gradient_checkpointing": False,
                "lora_dropout": plan["lora"]["dropout"]}
    args = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": SAMPLES_PER_STEP, "fp16": cuda}
    return Loaded(model, settings, args, padding_collator(plan["pad_id"]), 1)


def flattening_collator(flash_kwargs: bool, unsloth_lengths: bool) -> Callable[[list[dict]], dict]:
    """transformers' padding-free collator: one row, position ids restarting per sample; with flash-attn, the
    cu_seq_lens kwargs too (no per-layer host sync to find them); for unsloth, packed_seq_lengths as its own
    padding-free collator wrapper adds."""
    import torch
    from transformers import DataCollatorWithFlattening

    base = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash_kwargs)

    def collate(features: list[dict]) -> dict:
        batch = base(features)
        if unsloth_lengths:
            batch["packed_seq_lengths"] = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.int32)
        return batch
    return collate


def load_hf_padding_free(plan: dict) -> Loaded:
    """What a well-informed HF user picks: NF4 + double quantization + bf16 compute (or the config's dtype without
    quantization), flash_attention_2 padding-free batches of all 16 samples, non-reentrant checkpointing, fused
    AdamW."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = cuda_available()
    attention = pick_attention(cuda)
    dtype = getattr(torch, plan["dtype"])
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention,
                              "device_map": {"": 0} if cuda else None}
    if plan["quantize"]:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    seed_like_samebox(plan)
    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], **kwargs)
    model.config.use_cache = False
    model = get_peft_model(model, peft_lora(plan["lora"]))
    settings = {"attention": attention, "quantization": "nf4 + double quant" if plan["quantize"] else "none",
                "weights_dtype": plan["dtype"], "precision": f"{plan['dtype']} autocast" if cuda else plan["dtype"],
                "micro_batch": "16 samples flattened (DataCollatorWithFlattening)",
                "flash_attn_kwargs": attention == "flash_attention_2", "gradient_checkpointing": "non-reentrant",
                "lora_dropout": plan["lora"]["dropout"]}
    args = {"per_device_train_batch_size": SAMPLES_PER_STEP, "gradient_accumulation_steps": 1,
            "bf16": cuda and dtype == torch.bfloat16, "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            "optim": "adamw_torch_fused" if cuda else "adamw_torch"}
    return Loaded(model, settings, args, flattening_collator(attention == "flash_attention_2", False), SAMPLES_PER_STEP)


def load_unsloth(plan: dict) -> Loaded:
    """unsloth's documented path: FastLanguageModel (4-bit for the QLoRA config), its get_peft_model with
    lora_dropout 0 (its fast LoRA path needs 0) and use_gradient_checkpointing="unsloth" (offloaded checkpointing),
    trained by the HF Trainer it patches, on the same flattened batches plus packed_seq_lengths."""
    import torch
    from unsloth import FastLanguageModel  # imported already (import_unsloth)

    notes: list[str] = []
    stage = "FastLanguageModel.from_pretrained"
    try:
        common = {"model_name": plan["model_dir"], "max_seq_length": plan["max_length"],
                  "dtype": getattr(torch, plan["dtype"]), "load_in_4bit": plan["quantize"]}
        try:
            model, _tokenizer = FastLanguageModel.from_pretrained(**common)
        except Exception as e:  # noqa: BLE001 - the tokenizer repairs are not needed here: ids come from samebox
            notes.append(f"from_pretrained failed ({type(e).__name__}: {e}); retried with fix_tokenizer=False")
            model, _tokenizer = FastLanguageModel.from_pretrained(**common, fix_tokenizer=False)
        stage = "FastLanguageModel.get_peft_model"
        lora = plan["lora"]
        targets = ALL_LINEAR if lora["targets"] == "all-linear" else list(lora["targets"])
        model = FastLanguageModel.get_peft_model(model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=targets, bias="none",
                                                 use_gradient_checkpointing="unsloth",
                                                 random_state=plan["train"]["seed"])
    except Exception as e:
        raise ArmStageError(stage, e) from e
    settings = {"quantization": "nf4 + double quant (unsloth)" if plan["quantize"] else "none",
                "weights_dtype": plan["dtype"], "precision": f"{plan['dtype']} autocast",
                "micro_batch": "16 samples flattened + packed_seq_lengths",
                "gradient_checkpointing": "unsloth (offloaded)", "lora_dropout": 0.0,
                "lora_dropout_config": lora["dropout"], "attention": unsloth_attention(),
                "trainer": "transformers.Trainer (patched by unsloth)"}
    if lora["dropout"] != 0.0:
        notes.append(f"lora_dropout 0 (unsloth's fast path) where the samebox config says {lora['dropout']}")
    args = {"per_device_train_batch_size": SAMPLES_PER_STEP, "gradient_accumulation_steps": 1,
            "bf16": plan["dtype"] == "bfloat16", "fp16": plan["dtype"] == "float16", "optim": "adamw_torch_fused"}
    return Loaded(model, settings, args, flattening_collator(False, True), SAMPLES_PER_STEP, notes)


def unsloth_attention() -> str:
    """Which attention kernels unsloth found (its banner prints the same: FA2 = True/False, Xformers = ...)."""
    found = []
    for module, name in (("unsloth.models._utils", "HAS_FLASH_ATTENTION"),
                         ("unsloth.utils.attention_dispatch", "HAS_XFORMERS")):
        try:
            if getattr(importlib.import_module(module), name, False):
                found.append(name)
        except Exception as e:  # noqa: BLE001 - a description only
            found.append(f"{name}: unknown ({type(e).__name__})")
    return "unsloth: " + (", ".join(found) if found else "sdpa")


@dataclass(frozen=True)
class Arm:
    imports: Callable[[], None]  # the libraries, imported before the start-up's "imports" mark
    load: Callable[[dict], Loaded]  # weights, quantization and LoRA, before its "weights" mark


ARMS: dict[str, Arm] = {
    "recipe": Arm(import_hf, load_recipe),
    "hf_padding_free": Arm(import_hf, load_hf_padding_free),
    "unsloth": Arm(import_unsloth, load_unsloth),
}


class ArmStageError(Exception):
    """A failure inside an arm's setup, with the stage it happened in (import, from_pretrained, ...)."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.stage = stage


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in PEER_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def diagnostics() -> dict:
    """What a failing arm reports besides its traceback: versions, where packages came from, the GPU."""
    info: dict[str, Any] = {"versions": versions(), "sys_path_head": sys.path[:4],
                            "PYTHONPATH": os.environ.get("PYTHONPATH"),
                            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = repr(e)
    return info


def train_mix(loaded: Loaded, plan: dict, mix: dict, after_step_1: Callable[[], None] | None = None) -> dict:
    """One mix: a fresh Trainer (fresh optimizer and schedule) over the mix's first steps x 16 samples, in order;
    ``after_step_1`` is called when its first optimizer step has finished."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    blob = json.loads(Path(mix["tokens"]).read_text())
    steps = mix["steps"]
    n = steps * SAMPLES_PER_STEP
    dataset = [{"input_ids": i, "labels": lab} for i, lab in zip(blob["input_ids"][:n], blob["labels"][:n],
                                                                  strict=True)]
    times: list[float] = []
    losses: list[float] = []
    seen: list[int] = []

    def counting(features: list[dict]) -> dict:
        batch = loaded.collator(features)
        # The label tokens the loss really sees (shifted: position j - 1 predicts labels[j]).
        seen.append(int(batch["labels"][..., 1:].ne(IGNORE).sum()))
        return batch

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kw):
            return SequentialSampler(self.train_dataset)

    train = plan["train"]
    schedule = {"lr_scheduler_type": "cosine"} if not train["min_lr_ratio"] else {
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": train["min_lr_ratio"]}}
    args = TrainingArguments(output_dir=str(Path(mix["result"]).parent / f"{plan['arm']}-trainer"), max_steps=steps,
                             learning_rate=train["lr"], warmup_steps=0, weight_decay=train["weight_decay"],
                             max_grad_norm=train["max_grad_norm"], logging_steps=1, report_to="none",
                             save_strategy="no", remove_unused_columns=False, use_cpu=not cuda, seed=train["seed"],
                             dataloader_num_workers=0, disable_tqdm=True, **schedule, **loaded.trainer_args)
    trainer = InOrderTrainer(model=loaded.model, args=args, train_dataset=dataset, data_collator=counting,
                             callbacks=[step_timer(times, losses, cuda, after_step_1)])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    per_step = len(seen) // steps if steps else 0
    result = {"steps": steps, "step_s": times, "losses": losses, "train_wall_s": wall,
              "label_tokens": [sum(seen[s * per_step:(s + 1) * per_step]) for s in range(steps)],
              "label_tokens_expected": [sum(blob["label_tokens"][s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP])
                                        for s in range(steps)],
              "tokens": [sum(blob["lengths"][s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP]) for s in range(steps)]}
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def adapter_save_seconds(model: Any) -> float:
    """One save of the LoRA adapter (model.save_pretrained into a temporary directory): what a checkpoint costs."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model.save_pretrained(tmp)
        return time.perf_counter() - started


def run_arm(plan: dict) -> int:
    """Load once, then every mix of the plan from the same initial LoRA weights (restored between mixes)."""
    # The child's PYTHONPATH has the repository (trainer_peers.run_child); the parent imports this module for
    # versions() alone, where samebox may not be importable.
    from trainer.loop.startup import Startup

    startup = Startup(PEER_STAGES)
    out = Path(plan["result"])
    report: dict[str, Any] = {"arm": plan["arm"], "mixes": {}, "errors": []}

    def save() -> None:
        report["startup"] = {**startup.to_dict(), "checkpoint_holds": CHECKPOINT_HOLDS}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.rename(out)

    arm, stage = ARMS[plan["arm"]], "import"
    try:
        arm.imports()
        startup.mark("imports")
        stage = "load"
        loaded = arm.load(plan)
    except Exception as e:  # noqa: BLE001 - reported with its stage and the versions found
        stage = e.stage if isinstance(e, ArmStageError) else stage
        message = str(e) if isinstance(e, ArmStageError) else f"{type(e).__name__}: {e}"
        report["errors"].append({"stage": stage, "error": message,
                                 "traceback": traceback.format_exc()[-4000:], "diagnostics": diagnostics()})
        save()
        print(f"{plan['arm']}: FAILED at {stage}: {e}", file=sys.stderr, flush=True)
        return 1
    import torch

    startup.mark("weights")
    report["load_s"] = time.time() - startup.started  # from the process start, as end_to_end_s says
    report["settings"] = loaded.settings
    report["notes"] = loaded.notes
    report["versions"] = versions()
    initial = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    for k, mix in enumerate(plan["mixes"]):
        if k:
            with torch.no_grad():
                for name, p in loaded.model.named_parameters():
                    if name in initial:
                        p.copy_(initial[name])
                        p.grad = None
        if torch.cuda.is_available():
            if k == 0:  # from the process start to the model ready: loading, quantizing, LoRA
                report["load_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            result = train_mix(loaded, plan, mix, (lambda: startup.mark("step_1")) if k == 0 else None)
        except Exception as e:  # noqa: BLE001 - a failing mix must not lose the other one
            report["errors"].append({"stage": f"train {mix['mix']}", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-4000:], "diagnostics": diagnostics()})
            save()
            if isinstance(e, torch.OutOfMemoryError):
                continue
            return 1
        result["end_to_end_s"] = report["load_s"] + result["train_wall_s"]
        report["mixes"][mix["mix"]] = result
        if k == 0 and "step_1" in startup.marks:
            # The first checkpoint: one adapter save after this mix's steps, its seconds added to step 1's mark.
            # Saving right after step 1 (in the step callback) would sit inside the timed training (train_wall_s,
            # end_to_end_s) and between steps 1 and 2; the adapter is as large after the last step as after the
            # first, so this save costs what that one would.
            try:
                startup.marks["checkpoint"] = round(startup.marks["step_1"] + adapter_save_seconds(loaded.model), 2)
            except Exception as e:  # noqa: BLE001 - the throughput result stands without it
                report["notes"].append(f"checkpoint save failed: {type(e).__name__}: {e}")
        save()
        print(f"{plan['arm']} {mix['mix']}: losses {[round(x, 4) for x in result['losses']]}", flush=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(run_arm(json.loads(Path(sys.argv[1]).read_text())))
