"""Serving benchmark: `samebox serve` (the engine it picks) against plain `model.generate`, N concurrent clients.

  pip install --no-deps .whl/serve/*.whl && python bench/serve_gpu.py --out $OUT/serve_gpu.json
  python bench/serve_gpu.py --smoke --out /tmp/serve_smoke.json      # CPU, tiny model, a minute

A random model of Qwen2.5-1.5B's dimensions (bf16) and a random LoRA (r16, every linear layer) are made here, with a
byte-level tokenizer over the whole 151,936-id vocabulary (any id the random model emits decodes), saved as a
`samebox train` run directory. Every arm gets the same chat prompts (the same token ids), greedy decoding and the
same max_tokens; all N clients arrive at once, so time to first token includes any wait in a queue.

Arms: generate-sequential (the merged model answering one client after another, what a script around
model.generate does), generate-batched (all N prompts in one padded generate call), and `samebox serve RUN_DIR` in
a subprocess with continuous batching on and off, asked over HTTP with streaming chat completions. Arms that serve
one request at a time run up to --sequential-max clients only: beyond that their time grows linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=True)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# --- the model, the adapter, the run directory ------------------------------------------------------------------


def filler_tokenizer(vocab_size: int):
    """Byte-level BPE without merges: every text encodes one byte per token and decodes back exactly (so the chat
    template's markers survive, as the engine's response parser needs); ids past the bytes are filler tokens
    'w<id>', so whatever id the random model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def make_run(work: Path, dims: dict, rank: int) -> Path:
    """work/base (random weights, bf16), work/run (config.yaml + adapter/), as `samebox train` leaves a run."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.config import load_config

    tokenizer = filler_tokenizer(dims["vocab_size"])
    config = Qwen2Config(**dims, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.02)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base, run = work / "base", work / "run"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run / "adapter")
    cfg = load_config(None, [f"model.name={base}", f"data.path={work / 'data.jsonl'}", f"output.dir={run}"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run


def chat_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """Random letters: one token each under the filler tokenizer."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)]


def summarize(arm: str, clients: int, starts: list[float], firsts: list[float], ends: list[float],
              tokens: list[int]) -> dict:
    t0 = min(starts)
    ttft = [(f - t0) * 1000 for f in firsts]
    wall = max(ends) - t0
    return {"arm": arm, "clients": clients, "tokens": sum(tokens), "wall_s": round(wall, 4),
            "tokens_per_s": round(sum(tokens) / wall, 1), "ttft_ms_p50": round(statistics.median(ttft), 1),
            "ttft_ms_max": round(max(ttft), 1)}


# --- plain model.generate ---------------------------------------------------------------------------------------


class FirstToken:
    """A generate streamer that notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def generated_tokens(out: torch.Tensor, prompt_len: int, eos: int, pad: int) -> list[int]:
    new = out[:, prompt_len:]
    counts = []
    for row in new.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in (eos, pad):
                n = i + 1 if t == eos else i
                break
        counts.append(n)
    return counts


def generate_arms(run: Path, prompts: list[str], clients: list[int], max_tokens: int, sequential_max: int) -> list:
    from trainer.serve.export import merged_model
    from trainer.serve.served import resolve_model

    model, tok = merged_model(resolve_model(str(run)), "bf16")
    tok.padding_side = "left"
    device = model.device
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def encode(batch: list[str]):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in batch]
        return tok(texts, return_tensors="pt", padding=True).to(device)

    def run_generate(batch: list[str]) -> tuple[float, float, list[int]]:
        inputs = encode(batch)
        streamer = FirstToken()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=pad)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return streamer.first, time.perf_counter(), generated_tokens(out, inputs["input_ids"].shape[1], eos, pad)

    # Warm-up at full length, alone and at the largest batch: the first long generate of a shape pays for kernels
    # and the allocator's growth (seen on the H100: a first 1-client answer took 3-4x its later time).
    run_generate(prompts[:1])
    run_generate(prompts[:max(clients)])
    rows = []
    for n in clients:
        if n <= sequential_max:
            t0 = time.perf_counter()
            firsts, ends, tokens = [], [], []
            for p in prompts[:n]:
                first, end, count = run_generate([p])
                firsts.append(first)
                ends.append(end)
                tokens += count
            rows.append(summarize("generate-sequential", n, [t0] * n, firsts, ends, tokens))
            print(json.dumps(rows[-1]), flush=True)
        t0 = time.perf_counter()
        first, end, tokens = run_generate(prompts[:n])
        rows.append(summarize("generate-batched", n, [t0] * n, [first] * n, [end] * n, tokens))
        print(json.dumps(rows[-1]), flush=True)
    model = None  # free the GPU for the server arms
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# --- samebox serve ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, extra: list[str], log: Path, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, str]:
    """`samebox serve RUN --host 127.0.0.1 --port FREE *extra` in a subprocess (``env`` added to this process's),
    once it answers /health; its output goes to ``log``."""
    port = free_port()
    cmd = [sys.executable, "-m", "builder", "serve", str(run), "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"samebox serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"samebox serve did not come up in 600 s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGINT) -> None:
    """Stop a server start_server began: ``sig`` (Ctrl-C by default), then kill it after ``timeout`` seconds."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def stream_chat(url: str, name: str, prompt: str, max_tokens: int, out: dict) -> None:
    """One streaming chat completion; notes start, first content chunk, end and completion tokens."""
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    out["start"] = time.perf_counter()
    chunks, usage = 0, None
    with urllib.request.urlopen(request, timeout=1800) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                chunks += 1
                out.setdefault("first", time.perf_counter())
    out["end"] = time.perf_counter()
    out["tokens"] = usage["completion_tokens"] if usage else chunks


def serve_arm(run: Path, batching: str, device: str, prompts: list[str], clients: list[int], max_tokens: int,
              work: Path) -> tuple[list, str]:
    log = work / f"serve-{batching}.log"
    proc, url = start_server(run, ["--batching", batching, "--device", device], log)
    rows = []
    try:
        stream_chat(url, run.name, prompts[0], max_tokens, {})  # warm-up as for generate: full length, ...
        burst = [threading.Thread(target=stream_chat, args=(url, run.name, prompts[i], max_tokens, {}))
                 for i in range(max(clients))]  # ... and the largest burst
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        for n in clients:
            results = [{} for _ in range(n)]
            threads = [threading.Thread(target=stream_chat, args=(url, run.name, prompts[i], max_tokens, results[i]))
                       for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rows.append(summarize(f"serve-{batching}", n, [r["start"] for r in results],
                                  [r.get("first", r["end"]) for r in results], [r["end"] for r in results],
                                  [r["tokens"] for r in results]))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(proc, 60)
    engine = next((line.split("engine ", 1)[1] for line in log.read_text().splitlines()
                   if line.startswith("samebox serve: engine ")), "?")
    return rows, engine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the speed")
    p.add_argument("--clients", default=None, help="comma-separated client counts (default 1,8,32; smoke 1,2)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 128; smoke 8)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 200)")
    p.add_argument("--sequential-max", type=int, default=8, help="largest N for the one-at-a-time arms")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = p.parse_args()
    dims = TINY if args.smoke else QWEN_1_5B
    clients = [int(c) for c in (args.clients or ("1,2" if args.smoke else "1,8,32")).split(",")]
    max_tokens = args.max_tokens or (8 if args.smoke else 128)
    words = args.prompt_tokens or (16 if args.smoke else 200)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"

    import peft
    import transformers

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        run = make_run(work, dims, args.rank)
        print(f"model + adapter made in {time.perf_counter() - t:.1f} s", flush=True)
        prompts = chat_prompts(max(clients), words)
        rows = generate_arms(run, prompts, clients, max_tokens, args.sequential_max)
        engine = ""
        for batching in ("continuous", "off"):
            arm_clients = clients if batching == "continuous" else [n for n in clients if n <= args.sequential_max]
            arm_rows, engine = serve_arm(run, batching, device, prompts, arm_clients, max_tokens, work)
            rows += arm_rows
    result = {
        "what": "samebox serve vs plain model.generate: random Qwen2.5-1.5B-sized model (bf16) + random LoRA r"
                f"{args.rank} on every linear layer, greedy, {max_tokens} tokens per answer, {words}-token prompts, "
                "N clients arriving at once (streaming chat completions over HTTP for serve)",
        "smoke": args.smoke, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "engine": engine, "model": dims, "max_tokens": max_tokens, "prompt_tokens": words, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
