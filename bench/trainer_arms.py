"""The benchmark's child processes (bench/trainer_vs_recipe.py runs each in its own process): the model and
data preparation, the plain QLoRA recipe arm, and the packing-isolation check."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

SAMPLES_PER_STEP = 16
QWEN = {  # the public Qwen2.5 configs (hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings)
    "7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=27648, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
}
SPECIALS = ["<unk>", "<pad>", "</s>"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"



# ----- preparation (child process) ------------------------------------------------------------------------------
def prepare(size: str, workdir: Path, samples: int, median: int, cap: int, seed: int) -> None:
    """Random bf16 weights from the config, a byte-level tokenizer without merges (one letter = one token, however
    transformers 5 rebuilds it for a qwen2 model), synthetic prompt/completion JSONL."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

    model_dir = workdir / f"model-{size}"
    if not (model_dir / "config.json").is_file():
        dims = QWEN[size]
        vocab = {tok: i for i, tok in enumerate(SPECIALS)}
        vocab.update({c: len(SPECIALS) + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                            eos_token="</s>")
        config = Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                             eos_token_id=2, pad_token_id=1, bos_token_id=None, use_sliding_window=False)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    probe = "qwertyasdf"
    got = AutoTokenizer.from_pretrained(model_dir)(probe + "</s>" + probe, add_special_tokens=False)["input_ids"]
    if len(got) != 2 * len(probe) + 1:
        raise SystemExit(f"bench tokenizer does not map one letter to one token: {got}")
    rng = random.Random(seed)
    data = workdir / f"data-{size}.jsonl"
    with open(data, "w") as fh:
        for _ in range(samples):
            # Total tokens = prompt + completion + EOS, lognormal around the median, capped.
            total = max(8, min(cap, int(rng.lognormvariate(math.log(median), 0.8))))
            prompt_len = max(1, int(total * rng.uniform(0.2, 0.5)))
            text = "".join(rng.choice(LETTERS) for _ in range(total - 1))
            fh.write(json.dumps({"prompt": text[:prompt_len], "completion": text[prompt_len:]}) + "\n")


def step_timer(times: list[float], losses: list[float], cuda: bool, after_step_1: Callable[[], None] | None = None):
    """An HF Trainer callback: each optimizer step's seconds (GPU synchronised at both ends) and logged loss;
    ``after_step_1`` is called once the first step has finished (outside its timing)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if after_step_1 is not None and len(times) == 1:
                after_step_1()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepTimer()


# ----- the plain recipe, ported to transformers 5 (child process) ---------------------------------------------
def recipe_arm(model_dir: Path, data: Path, steps: int, out: Path, quantize: bool) -> None:
    """The seed recipe as written, with only what transformers 5 needs: labels (a causal-LM collator; the
    recipe passes none), an in-memory dataset (no `datasets` here), batches in file order (as the samebox arm),
    and BitsAndBytesConfig(load_in_4bit=True) for the removed load_in_4bit= argument."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    rows = [json.loads(line) for line in data.read_text().splitlines()][: steps * SAMPLES_PER_STEP]
    dataset = [{"input_ids": tokenizer(r["prompt"] + tokenizer.eos_token + r["completion"], truncation=True,
                                       max_length=2048)["input_ids"]} for r in rows]
    cuda = torch.cuda.is_available()
    attention = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True)} if quantize else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, device_map="auto",
                                                 **kwargs)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.05))
    times: list[float] = []
    losses: list[float] = []

    seen: list[int] = []

    class CountingCollator(DataCollatorForLanguageModeling):
        # The label tokens the loss really sees (shifted: a row of n tokens has n - 1), not a count derived here.
        def __call__(self, features, *a, **kw):
            batch = super().__call__(features, *a, **kw)
            seen.append(int(batch["labels"][..., 1:].ne(-100).sum()))
            return batch

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kw):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(out.parent / "recipe-out"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=16, logging_steps=1, max_steps=steps, fp16=cuda,
                             report_to="none", save_strategy="no", remove_unused_columns=False,
                             use_cpu=not cuda)
    trainer = InOrderTrainer(model=model, args=args, train_dataset=dataset, callbacks=[step_timer(times, losses, cuda)],
                             data_collator=CountingCollator(tokenizer, mlm=False))
    trainer.train()
    lengths = [len(d["input_ids"]) for d in dataset]
    per_step = [seen[s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP] for s in range(steps)]
    result = {"attention": attention, "step_s": times, "losses": losses, "label_tokens": [sum(c) for c in per_step],
              "tokens": [sum(lengths[s * SAMPLES_PER_STEP:(s + 1) * SAMPLES_PER_STEP]) for s in range(steps)],
              "in_process_s": time.perf_counter() - started}
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out.write_text(json.dumps(result))


# ----- are packed samples isolated? (child process) -----------------------------------------------------------
def packing_check(model_dir: Path, data: Path, out: Path, samples: int = 8) -> None:
    from packing_check import packing_isolation
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()[:samples]]
    ids = [tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"][:1024] for r in rows]
    out.write_text(json.dumps(packing_isolation(model_dir, ids)))
