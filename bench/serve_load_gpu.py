"""`samebox serve` flooded on a GPU: a random model of Qwen2.5-7B's dimensions (bf16) with a random LoRA r16 on every
linear layer (made here by bench/serve_gpu.py's make_run, as `samebox train` leaves a run), served with continuous
batching and its default limits, then driven by bench/serve_load.py with 64 and 160 clients. One JSON file with the
fixed header (command, machine, GPU, driver, versions, commit, date).

  python bench/serve_load_gpu.py --out $OUT/serve_load_gpu.json [--seconds 45] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from header import header  # noqa: E402
from serve_gpu import ROOT, make_run, start_server, stop_server  # noqa: E402

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=45)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", default="64,160")
    args = p.parse_args()
    result = {"header": header("python bench/serve_load_gpu.py " + " ".join(sys.argv[1:])), "model": QWEN_7B,
              "lora_rank": 16, "runs": []}
    with tempfile.TemporaryDirectory(prefix="serve-load-", dir="/tmp") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        run = make_run(work, QWEN_7B, 16)
        result["made_s"] = round(time.perf_counter() - t, 1)
        log = work / "serve.log"
        t = time.perf_counter()
        proc, url = start_server(run, ["--batching", "continuous", "--device", "cuda"], log)
        result["server_up_s"] = round(time.perf_counter() - t, 1)
        try:
            for n in (int(c) for c in args.clients.split(",")):
                out = work / f"load-{n}.json"
                cmd = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", url, "--clients", str(n),
                       "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens), "--timeout", "60",
                       "--out", str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                report = json.loads(out.read_text()) if out.is_file() else {"error": done.stderr[-3000:]}
                result["runs"].append({"clients": n, "exit": done.returncode, "report": report})
                print(json.dumps({"clients": n, **{k: report.get(k) for k in
                                                   ("requests", "ok", "refused", "errors", "hung", "after")}}),
                      flush=True)
        finally:
            stop_server(proc, 60, signal.SIGTERM)
            result["serve_log_tail"] = log.read_text()[-3000:]
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
