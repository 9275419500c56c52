"""Checks of the job's own kernels: flash-attn varlen against SDPA for the model's head dims (and the features
it needs), bitsandbytes NF4 and 8-bit AdamW, torch's SDPA backends, and a five-step LoRA smoke run."""

from __future__ import annotations

import math
from typing import Any

from builder.core import compat
from builder.core.compat import AGREEMENT_REL_ERROR
from builder.core.environment import Capability, sm_list
from builder.selftest.findings import Finding, fail, gpu_reading, na, no_gpu, nvml_devices, ok, probe_error, warn
from builder.selftest.probes import BITSANDBYTES, FLASH_ATTN, FUSED_LAYERS, LORA_SMOKE, SDPA_BACKENDS, TORCH

NF4_REL_ERROR = 1e-2
NO_KERNEL_IMAGE = "no kernel image is available"
FEATURE_NAMES = {
    "local": "sliding-window (local) attention",
    "softcap": "logit soft-capping",
    "alibi": "ALiBi",
    "dropout": "dropout",
    "uneven_k": "head dims other than " + ", ".join(map(str, compat.FLASH_ATTN_EVEN_HEAD_DIMS)),
}


def gpu_capability(r: dict[str, Any]) -> Capability | None:
    devices = nvml_devices(r)
    if devices and devices[0].get("compute_capability"):
        return Capability.parse(devices[0]["compute_capability"])
    tdev = (r.get(TORCH.name) or {}).get("devices") or []
    return Capability.parse(tdev[0]["capability"]) if tdev else None


def rebuild_flash_attn(cap: Capability | None) -> str:
    return (
        "rebuild it for this GPU and torch: "
        f"samebox wheel flash-attn --from-env --arch {cap or 'X.Y'} --profile full --install"
    )


def _crashed(reading: Any, what: str) -> Finding | None:
    if reading is None:
        return no_gpu()
    if reading.get("not_needed"):
        return na(f"{what}: not tested, the job does not use it", "test it with `samebox selftest --kernels ...`")
    err = probe_error(reading)
    return fail(f"the {what} probe crashed: {err}", "run `samebox selftest --json` for details") if err else None


def flash_attn(r: dict[str, Any]) -> list[Finding]:
    fa = gpu_reading(r, FLASH_ATTN)
    early = _crashed(fa, "flash-attn")
    if early:
        return [early]
    cap = gpu_capability(r)
    needs = r.get("model") or {}
    if not fa.get("installed"):
        error = fa.get("import_error", "")
        if "ModuleNotFoundError" in error:
            return [
                warn(
                    "flash-attn is not installed: the trainer falls back to SDPA (no padding-free packing)",
                    f"install a matching wheel: samebox wheel flash-attn --from-env --arch {cap or 'X.Y'} --install",
                )
            ]
        return [fail(f"flash-attn does not import: {error} (built for another torch/ABI?)", rebuild_flash_attn(cap))]
    label = f"flash-attn {fa.get('dist_version') or fa.get('version')}"
    archs = fa.get("elf_archs")
    if cap and archs is not None and not any(cap.runs(a) for a in archs):
        built = sm_list(archs) or "no SASS"
        return [
            fail(
                f"{label} has kernels for {built} only; this GPU is {cap.sm}: '{NO_KERNEL_IMAGE}'",
                rebuild_flash_attn(cap),
            )
        ]
    found = []
    for hd, case in sorted((fa.get("cases") or {}).items(), key=lambda kv: int(kv[0])):
        what = f"{label} varlen fwd+bwd, head dim {hd}, {fa.get('dtype')}"
        if "error" in case:
            if NO_KERNEL_IMAGE in case["error"]:
                found.append(
                    fail(
                        f"{what}: '{NO_KERNEL_IMAGE}' (no SASS for {cap.sm if cap else 'this GPU'})",
                        rebuild_flash_attn(cap),
                    )
                )
            else:
                found.append(fail(f"{what}: {case['error']}", rebuild_flash_attn(cap)))
            continue
        worst = max(case, key=lambda k: case[k])
        text = f"{what} vs SDPA: worst relative error {case[worst]:.1e} ({worst}), bound {AGREEMENT_REL_ERROR:.0e}"
        bad = not all(math.isfinite(v) for v in case.values()) or case[worst] > AGREEMENT_REL_ERROR
        found.append(fail(text, rebuild_flash_attn(cap)) if bad else ok(text))
    features = fa.get("features") or {}
    # The build's runtime guard says "does not support"; any other error is a broken kernel, reported by the cases.
    missing = [f for f in FEATURE_NAMES if features.get(f) and "does not support" in features[f]]
    for feature in needs.get("features") or []:
        if feature in missing:
            found.append(
                fail(
                    f"{label} is built without {FEATURE_NAMES[feature]}, which {needs.get('source')} needs "
                    f"({features[feature]})",
                    f"{rebuild_flash_attn(cap)}; or train on SDPA instead (samebox train: model.attention=sdpa)",
                )
            )
    window = fa.get("window_case")
    if window and "local" not in missing:
        if "error" in window:
            found.append(fail(f"{label} sliding window {fa.get('window')}: {window['error']}", rebuild_flash_attn(cap)))
        else:
            worst = max(window.values())
            text = f"{label} sliding window {fa.get('window')} vs SDPA: worst relative error {worst:.1e}"
            found.append(fail(text, rebuild_flash_attn(cap)) if worst > AGREEMENT_REL_ERROR else ok(text))
    if missing and not set(missing) & set(needs.get("features") or []):
        found.append(
            ok(
                f"{label} is built without {', '.join(FEATURE_NAMES[f] for f in missing)}; "
                "the model given does not need them"
            )
        )
    return found


def bitsandbytes(r: dict[str, Any]) -> list[Finding]:
    bnb = gpu_reading(r, BITSANDBYTES)
    early = _crashed(bnb, "bitsandbytes")
    if early:
        return [early]
    if not bnb.get("installed"):
        return [
            warn(
                f"bitsandbytes is not installed ({bnb.get('import_error')}): QLoRA (NF4) cannot run",
                "pip install --no-deps the bitsandbytes version your lockfile pins (or re-run the setup script)",
            )
        ]
    label = f"bitsandbytes {bnb.get('version')}"
    found = []
    if "nf4_error" in bnb:
        found.append(
            fail(
                f"{label} NF4 Linear4bit forward: {bnb['nf4_error']}",
                "reinstall bitsandbytes from the lock; it needs a CUDA build for this GPU",
            )
        )
    else:
        err = bnb["nf4_max_rel_error"]
        text = (
            f"{label} NF4 Linear4bit forward vs dequantized weights: relative error {err:.1e} (bound {NF4_REL_ERROR})"
        )
        found.append(
            ok(text)
            if math.isfinite(err) and err <= NF4_REL_ERROR
            else fail(text, "reinstall bitsandbytes from the lock")
        )
    if "adamw8bit_error" in bnb:
        found.append(
            fail(f"{label} 8-bit AdamW step: {bnb['adamw8bit_error']}", "reinstall bitsandbytes from the lock")
        )
    elif not (bnb.get("adamw8bit_changed") and bnb.get("adamw8bit_finite")):
        found.append(
            fail(
                f"{label} 8-bit AdamW step left the parameters unchanged or non-finite",
                "reinstall bitsandbytes from the lock",
            )
        )
    else:
        found.append(ok(f"{label} 8-bit AdamW step: parameters updated, finite"))
    return found


def sdpa_backends(r: dict[str, Any]) -> Finding:
    sdpa = gpu_reading(r, SDPA_BACKENDS)
    early = _crashed(sdpa, "SDPA")
    if early:
        return early
    working = sorted(k for k, v in sdpa.items() if v is True)
    if "flash_attention" in working or "efficient_attention" in working:
        return ok(f"torch SDPA backends that run here: {', '.join(working)}")
    if "math" in working:
        return warn(
            "only torch's math SDPA backend runs here: attention will be slow and memory-hungry",
            "use a GPU of compute capability >= 8.0 or a torch build with fused attention for it",
        )
    return fail(f"no torch SDPA backend runs here: {sdpa}", "reinstall the environment's torch")




def fused_layers(r: dict[str, Any]) -> Finding:
    """The trainer's fast path: never a failure (it falls back on its own), a warning when it will be slower."""
    fused = gpu_reading(r, FUSED_LAYERS)
    if fused is None:
        return no_gpu()
    if fused.get("not_needed"):
        return na("fused layers: not tested, the job does not use them",
                  "test them with `samebox selftest --kernels fused`")
    err = probe_error(fused)
    if err:
        return warn(f"the fused-layers probe crashed: {err}; training falls back to transformers + peft if they do",
                    "run `samebox selftest --kernels fused --json` for details")
    attn = {k: v for k, v in (fused.get("attention") or {}).items() if k != "sdpa"}
    good = [k for k, v in attn.items() if isinstance(v, float) and v < AGREEMENT_REL_ERROR]
    liger = fused.get("liger") or {}
    slow = []
    if not liger.get("installed"):
        slow.append("liger-kernel is not installed: torch's element-wise ops instead (slower)")
    elif liger.get("skipped"):
        pass
    elif not (isinstance(liger.get("rel_err"), float) and liger["rel_err"] < AGREEMENT_REL_ERROR):
        slow.append(f"Liger's kernels failed their check ({liger.get('error') or liger.get('rel_err')}): torch's ops "
                    "instead (slower)")
    if not good:
        slow.append(f"no varlen attention runs here ({attn or 'none installed'}): samples attend one at a time")
    if slow:
        return warn("fused layers: " + "; ".join(slow),
                    "install the lock's liger-kernel and flash-attn (`samebox wheel flash-attn --install`), or "
                    "torch >= 2.10 for its built-in varlen attention")
    kernels = ("Liger kernels installed (checked by the trainer when it starts)" if liger.get("skipped")
               else f"Liger kernels within {liger['rel_err']:.1e} of torch")
    shown = f"{kernels}; varlen attention: " + ", ".join(f"{k} {attn[k]:.1e}" for k in good)
    return ok(f"fused layers: {shown}")


def lora_smoke(r: dict[str, Any]) -> Finding:
    smoke = gpu_reading(r, LORA_SMOKE)
    early = _crashed(smoke, "LoRA smoke")
    if early:
        return early
    losses = smoke["losses"]
    shown = " -> ".join(f"{x:.3f}" for x in losses)
    if not all(math.isfinite(x) for x in losses):
        return fail(
            f"{smoke['steps']} LoRA steps on a tiny Llama: loss not finite ({shown})",
            "check the matmul_accuracy finding; reinstall torch/peft from the lock",
        )
    if losses[-1] >= losses[0]:
        return fail(
            f"{smoke['steps']} LoRA steps on a tiny Llama: loss did not fall ({shown})",
            "peft/transformers do not train here: reinstall them from the lock (see lockfile finding)",
        )
    return ok(f"{smoke['steps']} LoRA steps on a tiny Llama: loss {shown}")


def model_needs(r: dict[str, Any]) -> Finding:
    """The model's attention needs as read from --model (a finding so the report shows what was tested)."""
    m = r.get("model") or {}
    if m.get("source", "default") == "default":
        return na("no --model given: flash-attn tested at head dims 64 and 128, no sliding window")
    return ok(
        f"{m['source']}: head dim {', '.join(map(str, m['head_dims']))}, {m['dtype']}, "
        f"features {', '.join(m['features']) or 'none'}" + (f", window {m['window']}" if m.get("window") else "")
    )
