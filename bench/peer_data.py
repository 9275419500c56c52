"""The peer benchmark's data (bench/trainer_peers.py): the two mixes as JSONL, the random-weight model with a
byte-level ChatML tokenizer (one letter = one token), and each mix tokenized once by samebox's own code into the
token ids and HF labels every arm trains on.

  python bench/peer_data.py PLAN.json     # child process: the model (made once), tokens-*.json for each mix
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_arms import LETTERS, QWEN

IGNORE = -100
# ChatML as Qwen2.5 writes it: each turn renders as a prefix of the next (trainer/data/dataset.py checks that).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<pad>", "</s>", "<|im_start|>", "<|im_end|>"]


# ----- data mixes (pure Python: the parent writes them before any child starts) --------------------------------
def letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def short_rows(n: int, seed: int, median: int = 250, cap: int = 2048) -> list[dict]:
    """prompt/completion rows; tokens = prompt + completion + EOS, lognormal around the median, capped."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = max(8, min(cap, int(rng.lognormvariate(math.log(median), 0.8))))
        prompt_len = max(1, int(total * rng.uniform(0.2, 0.5)))
        text = letters(rng, total - 1)
        rows.append({"prompt": text[:prompt_len], "completion": text[prompt_len:]})
    return rows


def chat_rows(n: int, seed: int, median: int = 1200, cap: int = 2048) -> list[dict]:
    """messages rows: an optional system turn, then 1-3 user/assistant exchanges (2-7 turns). Rendered tokens
    (ChatML overhead + contents + EOS) are lognormal around the median and never above ``cap``, so no arm truncates."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        roles = (["system"] if rng.random() < 0.3 else []) + ["user", "assistant"] * rng.randint(1, 3)
        overhead = sum(len(r) + 4 for r in roles) + 1  # <|im_start|> role \n ... <|im_end|> \n, then EOS
        total = max(overhead + 8 * len(roles), min(cap - 8, int(rng.lognormvariate(math.log(median), 0.5))))
        weights = [rng.uniform(0.2, 0.5) if r == "system" else rng.uniform(0.3, 1.0) if r == "user"
                   else rng.uniform(1.0, 3.0) for r in roles]
        budget = total - overhead
        sizes = [max(1, int(budget * w / sum(weights))) for w in weights]
        sizes[-1] += budget - sum(sizes)  # the last (assistant) turn takes the rounding
        rows.append({"messages": [{"role": r, "content": letters(rng, s)} for r, s in zip(roles, sizes, strict=True)]})
    return rows


MIXES: dict[str, Callable[..., list[dict]]] = {"short": short_rows, "chat": chat_rows}


def write_mix(mix: str, n: int, path: Path, seed: int, smoke: bool = False) -> Path:
    if not path.is_file():
        kwargs = {"median": 30, "cap": 128} if smoke and mix == "short" else \
            {"median": 120, "cap": 256} if smoke else {}
        rows = MIXES[mix](n, seed, **kwargs)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return path


# ----- the random model and its tokenizer (child process) ------------------------------------------------------
def make_model(size: str, model_dir: Path, seed: int = 0) -> None:
    """Random weights from the public config (bf16; fp32 for the CPU smoke model), made on the GPU when there is
    one, and a byte-level tokenizer without merges (one letter = one token) with ChatML special tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    if (model_dir / "config.json").is_file():
        return
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(**QWEN[size], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         eos_token_id=2, pad_token_id=1, bos_token_id=None, use_sliding_window=False)
    dtype = torch.float32 if size == "smoke" else torch.bfloat16
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(model_dir)


def check_tokenizer(tokenizer: Any) -> None:
    probe = "qwertyasdf"
    got = tokenizer(probe + "</s>" + probe + "<|im_end|>", add_special_tokens=False)["input_ids"]
    if len(got) != 2 * len(probe) + 2:
        raise SystemExit(f"bench tokenizer does not map one letter to one token: {got}")


# ----- tokenize each mix once, with samebox's code (child process) ---------------------------------------------
def hf_labels(ids: list[int], targets: list[int]) -> list[int]:
    """samebox's shifted targets (targets[i] = what position i predicts) -> HF's unshifted labels (labels[j] = ids[j]
    where trained): the loss then predicts labels[j] from position j - 1, the same pairs."""
    labels = [IGNORE] + [ids[j] if targets[j - 1] != IGNORE else IGNORE for j in range(1, len(ids))]
    if any(t != IGNORE and t != ids[i + 1] for i, t in enumerate(targets[:-1])) or targets[-1] != IGNORE:
        raise SystemExit("samebox targets are not next-token ids; the label conversion would be wrong")
    return labels


def tokenize_mix(config: Path, overrides: list[str], out: Path) -> dict:
    """Token ids and labels exactly as `samebox train` makes them (its DataConfig, its tokenizer loading, its cache)."""
    from trainer.config import load_config
    from trainer.data.dataset import load_dataset
    from trainer.model.load import load_tokenizer

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model)
    check_tokenizer(tokenizer)
    data, cached = load_dataset(cfg.data, tokenizer)
    labels = [hf_labels(ids, t) for ids, t in zip(data.input_ids, data.targets, strict=True)]
    counts = [data.label_count(i) for i in range(len(data))]
    if counts != [sum(1 for x in lab if x != IGNORE) for lab in labels]:
        raise SystemExit("label-token counts differ between samebox targets and HF labels")
    blob = {"input_ids": data.input_ids, "labels": labels, "label_tokens": counts,
            "lengths": [len(s) for s in data.input_ids], "truncated": data.truncated, "pad_id": tokenizer.pad_token_id}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(blob))
    tmp.rename(out)
    return {"samples": len(data), "truncated": data.truncated, "cached": cached, "max_length": cfg.data.max_length}


def prepare(plan: dict) -> None:
    make_model(plan["size"], Path(plan["model_dir"]))
    report = {mix["mix"]: tokenize_mix(Path(plan["config"]), mix["overrides"], Path(mix["tokens"]))
              for mix in plan["mixes"]}
    Path(plan["result"]).write_text(json.dumps(report))


if __name__ == "__main__":
    prepare(json.loads(Path(sys.argv[1]).read_text()))
