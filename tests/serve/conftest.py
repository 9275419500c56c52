"""Fixtures for `samebox serve` / `samebox export` on the CPU: a tiny random Qwen2 with a ChatML tokenizer (trained
here, Qwen's chat template), a run directory as `samebox train` leaves it (config.yaml naming the base, adapter/
with a LoRA whose weights are random, so its output differs from the base's), and a real server in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.trainer.conftest import alpaca_rows

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
API_KEY = "sk-test-5f1d2c"


@pytest.fixture(autouse=True, scope="session")
def _the_transformers_asked_for() -> None:
    """tests/test_dev_lock.py runs these tests again over another transformers (SAMEBOX_TEST_TRANSFORMERS names
    it): they must run on that release, not fall back to the venv's."""
    want = os.environ.get("SAMEBOX_TEST_TRANSFORMERS")
    if want:
        import transformers

        assert transformers.__version__ == want, f"asked for transformers {want}, imported {transformers.__version__}"


def chatml_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["instruction"] + " " + r["output"] for r in alpaca_rows(300, seed=7)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def save_tiny_model(out: Path, hidden: int = 32, model_type: str = "qwen2", tied: bool = False, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = chatml_tokenizer()
    torch.manual_seed(seed)
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[model_type]
    # vocab_size past the tokenizer's, as Qwen2.5 pads its embedding: the GGUF vocabulary must pad to it too
    config = config_cls(vocab_size=len(tokenizer) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied, initializer_range=0.3)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_adapter(base_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA on every linear layer with random A and B (peft's init_lora_weights=False): it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def write_run_dir(run_dir: Path, base_dir: Path) -> Path:
    """config.yaml as `samebox train` writes it (the whole config, model.name the base)."""
    import yaml

    from trainer.config import load_config

    cfg = load_config(None, [f"model.name={base_dir}", "model.dtype=fp32", f"data.path={run_dir / 'data.jsonl'}",
                             f"output.dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny-qwen2")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, base_dir) -> Path:
    run = write_run_dir(tmp_path_factory.mktemp("runs") / "tiny-sft", base_dir)
    save_adapter(base_dir, run / "adapter")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`samebox serve` in a subprocess, as a user starts it; its output goes to a log file the tests read."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "builder", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=Path(__file__).resolve().parents[2])

    def wait_ready(self, timeout: float = 240.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"samebox serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"samebox serve did not answer /health in {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    srv = Server([str(run_dir)], tmp_path_factory.mktemp("serve") / "serve.log", {"SAMEBOX_API_KEY": API_KEY})
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def post(url: str, payload: dict | bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    """Plain HTTP, no client library: (status, JSON body)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy_text(model_dir: Path, prompt_ids: list[int], adapter: Path | None, max_new_tokens: int) -> str:
    """What plain transformers generates (greedy) for these prompt ids, with or without the adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
