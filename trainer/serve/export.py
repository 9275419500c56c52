"""`samebox export`: the adapter merged into the base's weights, as a model directory (with the tokenizer) or as
one GGUF file with an ollama Modelfile beside it. Atomic: the output appears whole under its name or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import SameboxError
from builder.core.fsutil import atomic_path, check_creatable, write_atomic
from trainer.serve.served import ServedModel

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Exported:
    path: Path
    lines: tuple[str, ...]  # what to tell the user: where it is, the command that uses it


def merged_model(served: ServedModel, dtype: str) -> tuple[Any, Any]:
    """(base with the adapter folded into its weights, tokenizer). The merge runs on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"trust_remote_code": served.trust_remote_code}
    # Loaded whole, then moved: device_map would dispatch through accelerate's hooks, a Python call per module
    # per forward that a token-by-token generate pays at every step.
    model = AutoModelForCausalLM.from_pretrained(str(served.base_dir), dtype=torch_dtype, **kwargs).to(device)
    if served.adapter_dir is not None:
        from trainer.model.load import hide_bitsandbytes

        hide_bitsandbytes()  # a merge quantizes nothing
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(served.adapter_dir)).merge_and_unload()
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(served.base_dir), **kwargs)


def check_new_output(out: Path, what: str) -> Path:
    """A path export may write, checked before minutes of loading: new (or an empty directory), and creatable."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SameboxError(f"{what} {out} exists; export never overwrites", "give a new path, or remove it first")
    check_creatable(out, what)
    return out


def export_merged(served: ServedModel, out: Path, dtype: str = "bf16") -> Exported:
    """OUT/: safetensors weights, config, generation config, tokenizer, and samebox-export.json naming the base and
    adapter. Written in a sibling temp directory, renamed into place when complete."""
    out = check_new_output(out, "--merge")
    model, tokenizer = merged_model(served, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_atomic(tmp / "samebox-export.json", json.dumps(provenance(served, dtype), indent=2) + "\n")
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary directory
        if out.exists():
            out.rmdir()  # an empty directory the user made for it
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, (f"merged {dtype} model: {out}",
                          f"serve it: samebox serve {out}",
                          f"GGUF from it: samebox export {out} --gguf {out}.gguf"))


def export_gguf(served: ServedModel, out: Path, quant: str = "q8_0", dtype: str = "bf16") -> Exported:
    """OUT.gguf plus OUT.Modelfile (ollama's recipe pointing at it), each written atomically."""
    from trainer.serve.gguf import QUANT_NAMES, check_convertible, write_gguf

    if quant not in QUANT_NAMES:
        raise SameboxError(f"--quant {quant!r} is not one samebox writes",
                           f"choose one of {', '.join(QUANT_NAMES)}; for q4_k_m and the other k-quants, run "
                           f"llama.cpp's llama-quantize on an f16 export: llama-quantize OUT.gguf OUT-q4_k_m.gguf "
                           "Q4_K_M")
    out = check_new_output(out, "--gguf")
    if out.suffix != ".gguf":
        raise SameboxError(f"--gguf {out}: the file name must end in .gguf", f"e.g. --gguf {out}.gguf")
    from transformers import AutoConfig

    check_convertible(AutoConfig.from_pretrained(str(served.base_dir), trust_remote_code=served.trust_remote_code),
                      served.base_dir)  # before minutes of loading
    model, tokenizer = merged_model(served, dtype)
    with atomic_path(out) as tmp:
        summary = write_gguf(model, tokenizer, served.base_dir, tmp, quant, served.name)
    modelfile = out.with_suffix(".Modelfile")
    write_atomic(modelfile, render_modelfile(out, tokenizer))
    name = ollama_name(served.name)
    lines = [f"GGUF ({summary.architecture}, {quant}): {out}", f"Modelfile: {modelfile}"]
    if summary.fallback_f16:
        lines.append(f"kept f16 (rows not a multiple of the {quant} block): {', '.join(summary.fallback_f16)}")
    lines += [f"ollama create {name} -f {modelfile.resolve()}",
              f"ollama run {name}",
              "on AutoDL, serve it on the public port: OLLAMA_HOST=0.0.0.0:6006 ollama serve"]
    return Exported(out, tuple(lines))


def render_modelfile(gguf_path: Path, tokenizer: Any) -> str:
    """FROM the GGUF beside it; ollama takes the chat template from the file's metadata. Stop at the end-of-turn
    token the tokenizer names."""
    lines = ["# Written by `samebox export --gguf`. Use: ollama create NAME -f THIS_FILE",
             f"FROM ./{gguf_path.name}"]
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    return "\n".join(lines) + "\n"


def ollama_name(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def provenance(served: ServedModel, dtype: str) -> dict:
    return {"base": str(served.base_dir), "adapter": str(served.adapter_dir) if served.adapter_dir else None,
            "run_dir": str(served.run_dir) if served.run_dir else None, "dtype": dtype, "written_by": "samebox export"}
