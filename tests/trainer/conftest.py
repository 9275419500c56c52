"""Fixtures for the trainer's CPU tests: a tokenizer trained here, a tiny random Qwen2 saved from a config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = "red green blue cat dog sun moon tree river stone fire water one two three four five six".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the output repeats the instruction's words in reverse."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        rows.append({"instruction": "reverse: " + " ".join(words), "output": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [r["instruction"] + " " + r["output"] for r in alpaca_rows(300, seed=99)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.3)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    """A TrainConfig for the tiny model on ``rows`` (alpaca rows by default), with overrides."""
    from trainer.config import load_config

    def make(rows: list | None = None, overrides: tuple[str, ...] = (), name: str = "run"):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else alpaca_rows(64))
        base = [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.path={data}",
                f"data.cache_dir={tmp_path / 'cache'}", f"output.dir={tmp_path / name}", "output.tensorboard=false",
                "train.samples_per_step=8", "train.micro_batch_tokens=256", "train.lr=5e-3", "lora.dropout=0.0",
                "train.warmup_ratio=0.0"]
        return load_config(None, base + list(overrides))

    return make
