"""The peer benchmark's measures and comparisons: throughput over the steady steps, MFU, each row's ratios against
unsloth and HF padding-free, step-1 loss and label-token agreement, the 50-step curve check, merging split runs,
the start-up seconds, and the markdown tables. Pure functions over the JSON the arms write (bench/trainer_peers.py
calls them)."""

from __future__ import annotations

from typing import Any

from peer_arms import ALL_LINEAR
from trainer_arms import QWEN

STEP1_TOLERANCE = 1e-3
CURVE_TOLERANCE = 0.02
ARM_ORDER = ("samebox", "unsloth", "hf_padding_free", "recipe")


# ----- per arm ---------------------------------------------------------------------------------------------------
def lora_flops(size: str, lengths: list[int], labels: list[int], rank: int, targets: list[str] | str) -> float:
    """Model FLOPs of LoRA training (trainer_vs_recipe.lora_flops's convention, any targets): forward (2 per frozen
    weight) + input gradients through the frozen weights (2 more, no weight gradients), attention forward +
    backward (3x a causal forward), the output layer on label positions (forward + input gradient), the full 6 per
    trainable LoRA weight. Recomputation is not counted (MFU, not HFU)."""
    d = QWEN[size]
    h, layers, inter, vocab = d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"], d["vocab_size"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}
    names = ALL_LINEAR if targets == "all-linear" else list(targets)
    frozen = layers * sum(i * o for i, o in shapes.values())
    lora = layers * rank * sum(i + o for name, (i, o) in shapes.items() if name in names)
    return sum(4 * frozen * t + 4 * vocab * h * n + 6 * layers * h * t * t + 6 * lora * t
               for t, n in zip(lengths, labels, strict=True))


def summarize_arm(raw: dict, step_flops: list[float], peak_tflops: float | None, skip: int) -> dict:
    """The numbers a row reports for one arm: throughput over the steps after the first ``skip``, memory, MFU."""
    times, labels, tokens = raw["step_s"], raw["label_tokens"], raw["tokens"]
    first = skip if len(times) > skip else 0
    seconds = sum(times[first:])
    out = {
        "label_tokens_per_s": sum(labels[first:len(times)]) / seconds if seconds else None,
        "tokens_per_s": sum(tokens[first:len(times)]) / seconds if seconds else None,
        "peak_allocated_gib": raw.get("peak_allocated_gib"), "peak_reserved_gib": raw.get("peak_reserved_gib"),
        "end_to_end_s": raw.get("end_to_end_s"), "steps": len(times), "measured_steps": f"{first + 1}-{len(times)}",
        "losses": raw["losses"], "step_s": times, "label_tokens": labels[:len(times)], "tokens": tokens[:len(times)],
    }
    flops = sum(step_flops[first:len(times)])
    out["mfu"] = flops / seconds / (peak_tflops * 1e12) if peak_tflops and seconds else None
    for key in ("settings", "notes", "micro_batches", "gpu", "process_s", "startup", "load_peak_allocated_gib",
                "process_peak_allocated_gib", "memory_gib"):
        if raw.get(key):
            out[key] = raw[key]
    return out


# ----- per row ---------------------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def startup_columns(startup: dict | None) -> dict[str, float | None]:
    """An arm's start-up in the same columns for samebox and its peers, from its marks (seconds since its process
    started): to step 1; imports = the process start to the libraries imported (samebox's data checks come before
    them); preflight = samebox's wait for its self-test after those imports; load = to the model ready to train
    (weights, quantization, LoRA; samebox's optimizer too); first step; save = the first checkpoint's own seconds;
    to the checkpoint. imports + preflight + load + first step = to step 1."""
    marks = (startup or {}).get("seconds_to", {})
    get = marks.get
    before_load = get("preflight", get("imports"))
    loaded = get("ready", get("weights"))
    diff = lambda a, b: round(a - b, 2) if a is not None and b is not None else None  # noqa: E731
    return {"step_1": get("step_1"), "imports": get("imports"), "preflight": diff(get("preflight"), get("imports")),
            "load": diff(loaded, before_load), "first_step": diff(get("step_1"), loaded),
            "save": diff(get("checkpoint"), get("step_1")), "checkpoint": get("checkpoint")}


def startup_ratios(row: dict, peer: str) -> dict[str, float | None]:
    """samebox's seconds over the peer's, to step 1 and to the first checkpoint (below 1: samebox starts sooner)."""
    s, p = (startup_columns(row["arms"].get(n, {}).get("startup")) for n in ("samebox", peer))
    return {k: ratio(s[k], p[k]) for k in ("step_1", "checkpoint")}


def compare_row(row: dict) -> None:
    """Fill in the row's ratios, step-1 loss agreement and label-token agreement from its arms (in place)."""
    arms = {k: v for k, v in row["arms"].items() if "label_tokens_per_s" in v}
    s = arms.get("samebox", {})
    for peer in ("unsloth", "hf_padding_free", "recipe"):
        p = arms.get(peer, {})
        row[f"ratio_vs_{peer}"] = ratio(s.get("label_tokens_per_s"), p.get("label_tokens_per_s"))
        row[f"memory_vs_{peer}"] = ratio(s.get("peak_allocated_gib"), p.get("peak_allocated_gib"))
    for peer in ("unsloth", "hf_padding_free"):
        row[f"startup_vs_{peer}"] = startup_ratios(row, peer)
    firsts = {name: a["losses"][0] for name, a in arms.items() if a.get("losses")}
    reference = next((n for n in ("samebox", "hf_padding_free", "unsloth", "recipe") if n in firsts), None)
    diffs = {n: abs(v - firsts[reference]) for n, v in firsts.items()} if reference else {}
    row["step1_loss"] = {"losses": firsts, "reference": reference, "abs_diff": diffs,
                         "max_abs_diff": max(diffs.values()) if diffs else None, "tolerance": STEP1_TOLERANCE,
                         "outside_tolerance": sorted(n for n, d in diffs.items() if d > STEP1_TOLERANCE)}
    row["step1_loss"]["agree"] = bool(diffs) and not row["step1_loss"]["outside_tolerance"]
    # After a few updates the arms' losses still move together when they train the same way (the recipe's
    # shorter run leaves it out once the others go further).
    longest = max((len(a.get("losses") or []) for a in arms.values()), default=0)
    row["last_step_loss"] = {"step": longest, "losses": {n: a["losses"][-1] for n, a in arms.items()
                                                         if len(a.get("losses") or []) == longest > 0}}
    expected = row.get("label_tokens_expected") or []
    row["label_tokens_agree"] = bool(arms) and all(
        a["label_tokens"] == expected[:len(a["label_tokens"])] for a in arms.values())


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def curve_check(a: list[float], b: list[float], window: int = 5) -> dict:
    """Loss curves of two arms over the same steps: max |difference| of their moving averages."""
    n = min(len(a), len(b))
    sa, sb = moving_average(a[:n], window), moving_average(b[:n], window)
    smoothed = [abs(x - y) for x, y in zip(sa, sb, strict=True)]
    raw = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
    top = max(smoothed) if smoothed else None
    return {"steps": n, "window": window, "smoothed_max_abs_diff": top, "raw_max_abs_diff": max(raw) if raw else None,
            "tolerance": CURVE_TOLERANCE, "ok": top is not None and top <= CURVE_TOLERANCE}


# ----- several runs, one file ----------------------------------------------------------------------------------
def merge_results(base: dict, newer: dict) -> dict:
    """Rows of ``newer`` fill or replace the same (model, mix, arm) of ``base``; its curve replaces base's."""
    merged = dict(newer)
    rows = {(r["model"], r["mix"]): r for r in base.get("rows", [])}
    for r in newer.get("rows", []):
        key = (r["model"], r["mix"])
        if key in rows:
            old = rows[key]
            old["arms"] = {**old["arms"], **r["arms"]}
            old["errors"] = [e for e in old.get("errors", []) if e.get("arm") not in r["arms"]] + r.get("errors", [])
            for k, v in r.items():
                if k not in ("arms", "errors"):
                    old[k] = v
        else:
            rows[key] = r
    merged["rows"] = list(rows.values())
    for row in merged["rows"]:
        compare_row(row)
    if base.get("curve") and not newer.get("curve"):
        merged["curve"] = base["curve"]
    merged["runs"] = base.get("runs", []) + newer.get("runs", [])
    return merged


# ----- the table ---------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def startup_table(result: dict) -> list[str]:
    """Seconds from each arm's process start, per row where an arm has them, and samebox's ratios (lines)."""
    lines = ["| model | mix | arm | to step 1 s | imports | preflight | load/quantize | first step | "
             "checkpoint save | to checkpoint s |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in result.get("rows", []):
        found = [n for n in ARM_ORDER if row["arms"].get(n, {}).get("startup")]
        for name in found:
            c = startup_columns(row["arms"][name]["startup"])
            lines.append(f"| {row['model']} | {row['mix']} | {name} | "
                         + " | ".join(fmt(c[k], ".2f") for k in ("step_1", "imports", "preflight", "load",
                                                                  "first_step", "save", "checkpoint")) + " |")
        if "samebox" in found and len(found) > 1:
            u, h = row.get("startup_vs_unsloth") or {}, row.get("startup_vs_hf_padding_free") or {}
            notes.append(f"start-up {row['model']}/{row['mix']}: samebox's seconds to step 1 "
                         f"{fmt(u.get('step_1'), '.2f')}x unsloth's, {fmt(h.get('step_1'), '.2f')}x HF "
                         f"padding-free's; to the first checkpoint {fmt(u.get('checkpoint'), '.2f')}x, "
                         f"{fmt(h.get('checkpoint'), '.2f')}x")
    return lines + [""] + notes if len(lines) > 2 else []


def markdown_table(result: dict) -> str:
    lines = ["| model | mix | arm | label tok/s | tok/s | peak alloc GiB | peak reserved GiB | MFU | end-to-end s | "
             "step-1 loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in result.get("rows", []):
        for name in ARM_ORDER:
            a = row["arms"].get(name)
            if a is None:
                continue
            if "label_tokens_per_s" not in a:
                lines.append(f"| {row['model']} | {row['mix']} | {name} | {a.get('skipped') or 'failed'} "
                             "| | | | | | |")
                continue
            loss = a["losses"][0] if a.get("losses") else None
            lines.append(f"| {row['model']} | {row['mix']} | {name} | {fmt(a['label_tokens_per_s'], ',.0f')} | "
                         f"{fmt(a['tokens_per_s'], ',.0f')} | {fmt(a['peak_allocated_gib'], '.2f')} | "
                         f"{fmt(a['peak_reserved_gib'], '.2f')} | {fmt(a['mfu'], '.1%')} | "
                         f"{fmt(a['end_to_end_s'], '.0f')} | {fmt(loss, '.4f')} |")
        s1 = row.get("step1_loss", {})
        notes.append(f"{row['model']}/{row['mix']}: samebox vs unsloth {fmt(row.get('ratio_vs_unsloth'), '.2f')}x "
                     f"at {fmt(row.get('memory_vs_unsloth'), '.2f')}x memory; vs HF padding-free "
                     f"{fmt(row.get('ratio_vs_hf_padding_free'), '.2f')}x at "
                     f"{fmt(row.get('memory_vs_hf_padding_free'), '.2f')}x; step-1 max diff "
                     f"{fmt(s1.get('max_abs_diff'), '.2e')} (outside {STEP1_TOLERANCE}: "
                     f"{', '.join(s1.get('outside_tolerance') or []) or 'none'}); loss at step "
                     f"{row.get('last_step_loss', {}).get('step')}: "
                     f"{', '.join(f'{n} {v:.4f}' for n, v in row.get('last_step_loss', {}).get('losses', {}).items())}"
                     f"; label tokens agree: "
                     f"{row.get('label_tokens_agree')}; errors: "
                     f"{[e.get('arm') or e.get('stage') for e in row.get('errors', [])]}")
    for row in result.get("rows", []):
        for e in row.get("errors", []):
            first = str(e.get("error") or f"exit {e.get('exit')}").strip().splitlines()[:1]
            notes.append(f"error {row['model']}/{row['mix']}/{e.get('arm') or e.get('stage')} at "
                         f"{e.get('stage')}: {first[0][:300] if first else ''}")
    curve = result.get("curve")
    if curve:
        notes.append(f"curve {curve.get('model')}/{curve.get('mix')}: {curve.get('steps')} steps, smoothed max diff "
                     f"{fmt(curve.get('smoothed_max_abs_diff'), '.4f')} (ok <= {CURVE_TOLERANCE}: {curve.get('ok')})")
    startup = startup_table(result)
    return "\n".join(lines + [""] + notes + ([""] + startup if startup else []))
