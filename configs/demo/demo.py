"""`make demo`: samebox end to end on a CPU in under a minute, with nothing downloaded.

It makes a tiny random Qwen2-like model and its tokenizer (trained here on configs/demo/train.jsonl, seeded: the
same files every time) in .demo/model, trains a LoRA on it with `samebox train configs/demo/demo.yaml`, starts
`samebox serve .demo/run` on a free local port, asks it one question over HTTP, prints the answer and stops the
server. Everything it writes is under .demo/ (gitignored), or under --work DIR. Run from anywhere:
python configs/demo/demo.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/demo/demo.yaml"
DATA = ROOT / "configs" / "demo" / "train.jsonl"
NAME = "samebox-demo"
QUESTION = "reverse: red cat moon"
# Qwen's ChatML: the template `samebox train` renders the chat rows with and `samebox serve` answers in.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
READY_S = 180.0


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def build_model(out: Path) -> None:
    """A ChatML BPE tokenizer trained on the demo's rows and a 2-layer Qwen2 with random (seeded) weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    # the template's own text too: a character the tokenizer never saw (its newline) would vanish from prompts
    corpus = [m["content"] for row in rows for m in row["messages"]] + ["system\n", "user\n", "assistant\n"]
    # Byte-level BPE as Qwen's, over the data's own characters only, with room for every word to become one token:
    # even a barely trained model answers in the data's words and letters, never in stray bytes.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=128, special_tokens=SPECIALS, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.3)
    shutil.rmtree(out, ignore_errors=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def samebox(*args: str) -> list[str]:
    return [sys.executable, "-m", "builder", *args]


def environment(**extra: str) -> dict[str, str]:
    """This checkout's samebox first on the path, whatever else is installed; no hub lookups."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: samebox serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SystemExit(f"demo: samebox serve did not answer {url}/health in {READY_S:.0f} s:\n{log.read_text()}")


def ask(url: str, key: str, question: str) -> tuple[int, str]:
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                       "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (its engine may run a process of its own), then SIGKILL if need be."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="samebox end to end on a CPU: build, train, serve, ask")
    parser.add_argument("--work", type=Path, default=ROOT / ".demo", help="where everything goes (default: .demo/)")
    work = parser.parse_args(argv).work.resolve()
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    say(f"building a tiny random Qwen2-like model in {work / 'model'}")
    build_model(work / "model")
    # demo.yaml's paths are .demo/...; the overrides put them under --work
    paths = [f"model.name={work / 'model'}", f"data.cache_dir={work / 'cache'}", f"output.dir={work / 'run'}"]
    say(f"training: samebox train {CONFIG} --no-preflight --overwrite (on the CPU, a few seconds)")
    subprocess.run(samebox("train", CONFIG, "--no-preflight", "--overwrite", *paths), cwd=ROOT, env=environment(),
                   check=True)
    port, key = free_port(), secrets.token_hex(16)  # the key goes through the environment, never argv
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    say(f"serving: samebox serve {work / 'run'} --name {NAME} --host 127.0.0.1 --port {port} (log: {log})")
    with log.open("w") as out:
        proc = subprocess.Popen(samebox("serve", str(work / "run"), "--name", NAME, "--host", "127.0.0.1", "--port",
                                        str(port), "--device", "cpu"),
                                cwd=ROOT, env=environment(SAMEBOX_API_KEY=key), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(proc, url, log)
        status, answer = ask(url, key, QUESTION)
    finally:
        stop(proc)
    say(f"asked {QUESTION!r}: HTTP {status}")
    if status != 200:
        print(f"demo: the server refused: {answer}", file=sys.stderr)
        return 1
    say(f"answer (a tiny model after 24 steps: words, not wisdom): {answer!r}")
    say(f"done in {time.monotonic() - started:.0f} s; the run is in {work / 'run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
