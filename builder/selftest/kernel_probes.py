"""Live probes of the job's own kernels -> readings: flash-attn varlen (builder/wheels/kernelcheck.py's check, as the
wheel verifier runs it), bitsandbytes NF4 and 8-bit AdamW, torch SDPA backends, the trainer's fused layers, and a
five-step LoRA smoke run. Each returns a JSON-ready dict; the checks judge it."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Callable
from typing import Any

from builder.wheels import kernelcheck

# Calls that need a compile-time-disabled flash-attn feature; the build's runtime guard raises for each.
FLASH_ATTN_FEATURES = ("local", "softcap", "alibi", "dropout", "uneven_k")


def elf_archs(shared_object: str) -> list[str] | None:
    """SASS architectures inside a CUDA extension ('9.0', ...), or None when cuobjdump is not installed or cannot
    read it (the varlen cases still find a missing kernel by running it)."""
    tool = kernelcheck.find_cuobjdump()
    if not tool:
        return None
    try:
        return list(kernelcheck.elf_archs(shared_object, tool))
    except (kernelcheck.CuobjdumpError, OSError, subprocess.TimeoutExpired):
        return None


def _dist_version(name: str) -> str | None:
    """The installed distribution's version; samebox-built wheels end it with their build profile ('.lean',
    '.slim' or '.full')."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _flash_attn_extension() -> str | None:

    spec = importlib.util.find_spec("flash_attn_2_cuda")
    return spec.origin if spec and spec.origin else None


def _feature_call(fa: Any, feature: str) -> str | None:
    """Calls flash-attn with one optional feature on; None when it ran, else the error text."""
    import torch

    # uneven_k: head dim 80, which flash-attn pads to 96 (a lean build refuses it).
    q = torch.randn(1, 64, 2, 80 if feature == "uneven_k" else 64, device="cuda", dtype=torch.bfloat16)
    kwargs: dict[str, Any] = {
        "local": {"window_size": (16, 0), "causal": True},
        "softcap": {"softcap": 30.0},
        "alibi": {"alibi_slopes": torch.ones(2, device="cuda", dtype=torch.float32)},
        "dropout": {"dropout_p": 0.1},
        "uneven_k": {},
    }[feature]
    try:
        fa.flash_attn_func(q, q, q, **kwargs)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # the build's runtime guard: "This flash attention build does not support ..."
        return str(e).splitlines()[0]


def flash_attn(
    head_dims: list[int],
    dtype_name: str = "bfloat16",
    window: int | None = None,
    extension: str | None = None,
    features: tuple[str, ...] = FLASH_ATTN_FEATURES,
) -> dict[str, Any]:
    """Readings for flash-attn: installed version, SASS archs of its extension, each head dim's errors against
    SDPA (or the error text), and which of ``features`` the build has (each is a first call of another kernel:
    quick asks only for those the model needs)."""
    import torch

    reading: dict[str, Any] = {"head_dims": head_dims, "dtype": dtype_name, "window": window}
    start = time.perf_counter()
    try:
        import flash_attn as fa
    except Exception as e:  # ImportError, or an undefined-symbol OSError from a wheel built for another torch
        reading.update(installed=False, import_error=f"{type(e).__name__}: {e}")
        return reading
    reading["import_s"] = round(time.perf_counter() - start, 3)
    so = extension or _flash_attn_extension()
    reading.update(
        installed=True,
        version=getattr(fa, "__version__", "?"),
        dist_version=_dist_version("flash_attn"),
        extension=so,
        elf_archs=elf_archs(so) if so else None,
    )
    dtype = getattr(torch, dtype_name)
    cases: dict[str, Any] = {}
    for hd in head_dims:
        try:
            cases[str(hd)] = kernelcheck.varlen_errors(fa.flash_attn_varlen_func, hd, dtype)
        except Exception as e:
            cases[str(hd)] = {"error": str(e).splitlines()[0]}
    reading["cases"] = cases
    reading["features"] = {f: _feature_call(fa, f) for f in features}
    if window:
        try:
            reading["window_case"] = kernelcheck.varlen_errors(fa.flash_attn_varlen_func, head_dims[-1], dtype, window)
        except Exception as e:
            reading["window_case"] = {"error": str(e).splitlines()[0]}
    return reading


def bitsandbytes() -> dict[str, Any]:
    """NF4 Linear4bit forward against x @ dequantized weight, and one 8-bit AdamW step."""
    import torch

    start = time.perf_counter()
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:
        return {"installed": False, "import_error": f"{type(e).__name__}: {e}"}
    reading: dict[str, Any] = {
        "installed": True,
        "version": getattr(bnb, "__version__", "?"),
        "import_s": round(time.perf_counter() - start, 3),
    }
    try:
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        y = layer(x)
        w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        ref = x @ w.t()
        reading["nf4_max_rel_error"] = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    except Exception as e:
        reading["nf4_error"] = str(e).splitlines()[0]
    try:
        p = torch.nn.Parameter(torch.randn(4096, device="cuda"))
        before = p.detach().clone()
        opt = bnb.optim.AdamW8bit([p], lr=1e-2)
        p.grad = torch.randn_like(p)
        opt.step()
        reading["adamw8bit_changed"] = bool((p.detach() != before).any().item())
        reading["adamw8bit_finite"] = bool(torch.isfinite(p.detach()).all().item())
    except Exception as e:
        reading["adamw8bit_error"] = str(e).splitlines()[0]
    return reading


def sdpa_backends() -> dict[str, Any]:
    """Which SDPA backends torch enables and which of them actually run a bf16 causal attention here."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            result[name.lower()] = "absent from this torch"
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize()
            result[name.lower()] = True
        except RuntimeError as e:
            result[name.lower()] = str(e).splitlines()[0][:200]
    return result


LIGER_AT_START = "quick: the trainer checks Liger against torch when it starts (samebox selftest --full checks it here)"


# The trainer's fused layers are the trainer's to test: trainer/fused/selfcheck.py registers its check here
# (`samebox selftest` does, from builder/cli); the self-test itself imports nothing of the trainer.
_FUSED_CHECK: Callable[..., dict[str, Any]] | None = None


def register_fused_layers(check: Callable[..., dict[str, Any]]) -> None:
    global _FUSED_CHECK
    _FUSED_CHECK = check


def fused_layers(head_dim: int = 128, every_backend: bool = True, liger: bool = True) -> dict[str, Any]:
    """The trainer's fused layers on this GPU (the registered check: Liger's kernels against the torch reference,
    the varlen attention backends against per-sample SDPA). Quick passes ``every_backend=False`` (stop at the first
    backend that agrees: the one the trainer will pick) and ``liger=False``: importing Liger took 10-15 s of a 22 s
    quick run on an H200, and the trainer checks Liger against torch itself before it uses it."""
    if _FUSED_CHECK is None:
        return {"error": "the trainer's fused-layer check is not registered (run it through `samebox selftest`)"}
    out = _FUSED_CHECK(head_dim=head_dim, every_backend=every_backend, liger=liger)
    if not liger:
        out["liger"] = {**(out.get("liger") or {}), "skipped": LIGER_AT_START}
    return out


def lora_smoke(steps: int = 5) -> dict[str, Any]:
    """Five LoRA steps (peft) on a tiny random Llama on the GPU, one fixed batch: the losses."""
    start = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import_s = round(time.perf_counter() - start, 3)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 256, (4, 64), device="cuda")
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "steps": steps, "import_s": import_s}
