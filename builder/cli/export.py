"""`samebox export RUN_DIR|MODEL (--merge OUT | --gguf OUT.gguf [--quant q8_0])`: the adapter merged into the
base's weights, as a model directory with the tokenizer, or as a GGUF file for ollama and llama.cpp (with the
Modelfile and the exact `ollama create` command). Nothing half-written is ever left under OUT.
"""

from __future__ import annotations

import argparse

from builder.core import supported


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.serve.gguf import QUANT_NAMES

    p = sub.add_parser("export", help="merge a trained adapter into its base: a model directory or a GGUF file")
    p.add_argument("target", metavar="RUN_DIR|MODEL",
                   help="a `samebox train` output dir, or a model (local dir, hub id) with --adapter")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter to merge (default: RUN_DIR/adapter)")
    p.add_argument("--name", help="model name written into the GGUF and used for ollama (default: the run's name)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--merge", metavar="OUT", help="write the merged model (safetensors + tokenizer) to OUT/")
    out.add_argument("--gguf", metavar="OUT.gguf", help="write the merged model as one GGUF file (+ OUT.Modelfile)")
    p.add_argument("--quant", default="q8_0", choices=QUANT_NAMES,
                   help="GGUF tensor type, as llama.cpp names it (default: q8_0); k-quants: llama-quantize")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="dtype the merge runs in and --merge writes (default: bf16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    supported.require("export")  # a release outside the tested range: said now, not mid-run
    from trainer.serve.export import export_gguf, export_merged
    from trainer.serve.served import resolve_model

    served = resolve_model(args.target, args.adapter, args.name)
    if args.merge:
        result = export_merged(served, args.merge, args.dtype)
    else:
        result = export_gguf(served, args.gguf, args.quant, args.dtype)
    for line in result.lines:
        print(f"samebox export: {line}")
    return 0
