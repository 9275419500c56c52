"""GPU check of the trainer's fused layers, in one call: kernels, attention backends, correctness, layer timing.

  python bench/fused_gpu.py --out $OUT/fused_gpu.json [--layers 2] [--tokens 24576] [--profile]

1. Liger's kernels against the torch reference, and each varlen attention backend against per-sample SDPA, at
   the Qwen2.5-7B and -1.5B head layouts.
2. Correctness: a small random Qwen2 in NF4 and in bf16; the fused decoder and peft (per sample, no packing) each
   against an fp32 copy of the same (dequantized) weights: hidden states and LoRA gradients.
3. Timing: decoder layers at Qwen2.5-7B's dimensions (NF4, LoRA r16 on all seven projections) on one packed
   micro-batch of chat-like samples: the fused layers (offloaded and not) against transformers + peft with
   non-reentrant checkpointing and flash-attn varlen (or SDPA) packing; forward + backward milliseconds per
   layer, tokens/s per layer, peak memory, and with --profile the top CUDA kernels of the fused pass.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.fused import attention as attn  # noqa: E402
from trainer.fused import fused_decoder  # noqa: E402
from trainer.fused import kernels as K  # noqa: E402
from trainer.fused.linear import quantize_nf4  # noqa: E402

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)


def make_model(dims: dict, layers: int, nf4: bool, device: torch.device, attention: str, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(**dims, num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=32768,
                         use_sliding_window=False, rope_theta=1e6)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)
    if nf4:
        quantize_nf4(model, device)
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model


def chat_lengths(tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < tokens:
        out.append(max(64, min(2048, int(rng.lognormvariate(math.log(1200), 0.6)))))
    out[-1] -= sum(out) - tokens
    return [n for n in out if n > 0]


def packed(lengths: list[int], vocab: int, device: torch.device):
    ids = torch.randint(0, vocab, (1, sum(lengths)), device=device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return ids, pos, cu, max(lengths)


def check_kernels(device: torch.device) -> dict:
    out: dict = {}
    try:
        out["liger_rel_err"] = K.agreement(K.liger_kernels(), device)
    except Exception as e:
        out["liger_error"] = f"{type(e).__name__}: {e}"[:300]
    for label, heads, kv in (("7b", 28, 4), ("1.5b", 12, 2)):
        for name in attn.available(device):
            try:
                out[f"attention_{name}_{label}_rel_err"] = attn.check(name, device, torch.bfloat16, heads, kv, 128)
            except Exception as e:
                out[f"attention_{name}_{label}_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def correctness(device: torch.device, attention: str) -> dict:
    """Fused and peft against an fp32 model with the same (dequantized) weights, small dims."""
    import bitsandbytes.functional as bnbf

    dims = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2)
    if device.type != "cuda":
        dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    results = {}
    for nf4 in (True, False):
        model = make_model(dims, 2, nf4, device, attention)
        truth = make_model(dims, 2, False, device, "sdpa")
        with torch.no_grad():
            src = dict(model.named_modules())
            for name, module in truth.named_modules():
                other = src.get(name)
                if other is None or not hasattr(module, "weight") or "lora" in name:
                    continue
                w = other.weight
                if type(other).__name__ == "Linear4bit":
                    w = bnbf.dequantize_4bit(other.weight.data, other.weight.quant_state)
                module.weight.data = w.float().clone()
                if getattr(other, "bias", None) is not None:
                    module.bias.data = other.bias.float().clone()
            truth.float()
            lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
            for n, p in truth.named_parameters():
                if p.requires_grad:
                    p.data.copy_(lora[n])
        lengths = [37, 300, 5, 180, 1500, 2048, 900] if device.type == "cuda" else [37, 300, 5, 180]
        ids, pos, cu, mx = packed(lengths, 1024, device)
        weights = torch.randn(sum(lengths), dims["hidden_size"], device=device)

        def grads_of(m):
            ps = [p for p in m.parameters() if p.requires_grad]
            out = [p.grad.float().clone() for p in ps]
            for p in ps:
                p.grad = None
            return out

        def per_sample(m, autocast: bool, ids=ids, lengths=lengths, weights=weights):
            body = m.get_base_model().model
            hs, start = [], 0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                for n in lengths:
                    hs.append(body(input_ids=ids[:, start:start + n]).last_hidden_state[0])
                    start += n
            h = torch.cat(hs).float()
            (h * weights).sum().backward()
            return h.detach(), grads_of(m)

        t_h, t_g = per_sample(truth, False)
        p_h, p_g = per_sample(model, True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]

        def rel(a, b):
            return float((a - b).norm() / b.norm().clamp_min(1e-30))

        entry: dict = {"tokens": sum(lengths), "peft": {"hidden": rel(p_h, t_h),
                                                        "grad_max": max(map(rel, p_g, t_g))}}
        kernel_sets = ["torch"] + (["liger"] if device.type == "cuda" else [])
        for kernels in kernel_sets:
            for backend in attn.available(device):
                for offload in (True, False):
                    decoder, note = fused_decoder(model, "true", torch.bfloat16, device, offload=offload,
                                                  kernels=kernels)
                    decoder.attention = backend
                    decoder.mlp_chunk = 1024  # several MLP chunks, as a long micro-batch has
                    with torch.autocast(device.type, dtype=torch.bfloat16):  # as the trainer calls it
                        f_h = decoder(ids, pos, cu_seq_lens_q=cu.to(device), max_length_q=mx).last_hidden_state
                    f_h = f_h[0].float()
                    (f_h * weights).sum().backward()
                    f_g = grads_of(model)
                    errs = sorted(((rel(a, b), n) for a, b, n in zip(f_g, t_g, names, strict=True)), reverse=True)
                    entry[f"{kernels}/{backend}/offload={offload}"] = {
                        "hidden": rel(f_h, t_h), "grad_max": errs[0][0],
                        "worst": [(round(e, 4), n.split("model.layers.")[-1]) for e, n in errs[:3]]}
        results["nf4" if nf4 else "bf16"] = entry
        del model, truth, decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def trainer_runs(device: torch.device, workdir: Path) -> dict:
    """`samebox train` for 4 steps on a small random Qwen2 (chat mix, one micro-batch per step), through the
    fused layers in each variant and through transformers + peft: the loss curves must agree."""
    import os
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_data import make_model as make_saved
    from peer_data import write_mix
    from trainer_arms import QWEN

    QWEN["mini"] = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model-mini"
    make_saved("mini", model_dir)
    data = write_mix("chat", 64, workdir / "chat-mini.jsonl", seed=0)
    variants = {"peft": ({}, ["train.fused=false"]), "fused": ({}, []),
                "fused_torch_kernels": ({"SAMEBOX_FUSED_KERNELS": "torch"}, []),
                "fused_no_offload": ({}, ["train.offload_activations=false"]),
                "fused_sdpa": ({"SAMEBOX_FUSED_ATTENTION": "sdpa"}, [])}
    out: dict = {}
    repo = Path(__file__).resolve().parent.parent
    for config in ("configs/qwen2.5-1.5b-lora.yaml", "configs/qwen2.5-7b-qlora-24gb.yaml"):
        label = "nf4" if "qlora" in config else "bf16"
        for name, (env, extra) in variants.items():
            run = workdir / f"run-{label}-{name}"
            cmd = [sys.executable, "-m", "builder", "train", config, f"model.name={model_dir}",
                   f"data.path={data}", "data.shuffle=false", f"data.cache_dir={workdir / 'cache'}",
                   "train.max_steps=4", "train.warmup_ratio=0", f"output.dir={run}", "output.tensorboard=false",
                   "--no-preflight", "--overwrite", *extra]
            proc = subprocess.run(cmd, cwd=repo, env={**os.environ, **env}, capture_output=True, text=True,
                                  timeout=300)
            rows = []
            if (run / "metrics.jsonl").is_file():
                rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "loss" in r]
            out[f"{label}/{name}"] = {"rc": proc.returncode, "losses": [round(r["loss"], 4) for r in steps],
                                      "grad_norms": [round(r["grad_norm"], 4) for r in steps],
                                      "tail": proc.stderr[-600:] if proc.returncode else ""}
            print(label, name, out[f"{label}/{name}"]["losses"], out[f"{label}/{name}"]["grad_norms"], flush=True)
    return out


def time_layers(device: torch.device, layers: int, tokens: int, attention: str, profile: bool) -> dict:
    """ms per layer for forward + backward of one packed micro-batch, fused vs transformers + peft."""
    model = make_model(QWEN7B, layers, True, device, attention)
    base = model.get_base_model()
    lengths = chat_lengths(tokens)
    ids, pos, cu, mx = packed(lengths, 1024, device)
    grad = torch.randn(1, sum(lengths), QWEN7B["hidden_size"], device=device, dtype=torch.bfloat16)
    results: dict = {"tokens": sum(lengths), "samples": len(lengths), "layers": layers}

    def run(fn, label: str, reps: int = 3) -> None:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            out = fn()
            out.backward(grad)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            for p in model.parameters():
                p.grad = None
        ms = 1000 * sorted(times[1:])[len(times[1:]) // 2] / layers
        results[label] = {"ms_per_layer": ms, "tokens_per_s_per_layer": sum(lengths) / ms * 1000,
                          "peak_extra_gib": (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if cuda else None}
        print(f"{label}: {ms:.1f} ms/layer, +{results[label]['peak_extra_gib']} GiB", flush=True)

    for offload in (True, False):
        decoder, note = fused_decoder(model, "true", torch.bfloat16, device, offload=offload)
        results.setdefault("fused_path", note)
        run(lambda d=decoder: d(ids, pos, cu_seq_lens_q=cu.to(device), max_length_q=mx).last_hidden_state,
            f"fused_offload_{offload}")
        if profile and offload and device.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CUDA]) as p:
                decoder(ids, pos, cu_seq_lens_q=cu.to(device), max_length_q=mx).last_hidden_state.backward(grad)
                torch.cuda.synchronize()
            results["fused_top_kernels"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=18)
            print(results["fused_top_kernels"], flush=True)
            for prm in model.parameters():
                prm.grad = None
    # transformers + peft, checkpointed, packed via position ids (flash-attn varlen kwargs when it is there)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs = {}
    if attention == "flash_attention_2":
        kwargs = {"cu_seq_lens_q": cu.to(device), "cu_seq_lens_k": cu.to(device), "max_length_q": mx,
                  "max_length_k": mx}
    model.train()

    def peft_pass():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return base.model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state

    run(peft_pass, "peft_checkpointed")
    results["speedup_fused_vs_peft"] = (results["peft_checkpointed"]["ms_per_layer"]
                                        / results["fused_offload_True"]["ms_per_layer"])
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24576)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, small dims: checks this script, not the GPU")
    ap.add_argument("--stages", default="kernels,correctness,trainer,timing")
    ap.add_argument("--workdir", default="/tmp/samebox-fused")
    opts = ap.parse_args()
    device = torch.device("cpu" if opts.smoke else "cuda")
    if opts.smoke:
        QWEN7B.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    import importlib.util

    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report: dict = {"command": " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__, "hf_attention": attention}
    stages = (("kernels", lambda: check_kernels(device)), ("correctness", lambda: correctness(device, attention)),
              ("trainer", lambda: trainer_runs(device, Path(opts.workdir))),
              ("timing", lambda: time_layers(device, opts.layers, opts.tokens, attention, opts.profile)))
    for name, fn in stages:
        if name not in opts.stages.split(","):
            continue
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:
            import traceback

            report[name] = {"error": traceback.format_exc()[-2000:]}
            print(f"{name} failed: {e}", flush=True)
        report[f"{name}_s"] = time.perf_counter() - t0
        Path(opts.out).write_text(json.dumps(report, indent=2, default=str))
        print(json.dumps({k: v for k, v in report[name].items() if k != "fused_top_kernels"}, indent=1,
                         default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
