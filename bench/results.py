"""Write the numbers tables of README.md and bench/README.md from bench/results/*.json (`make results`).

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` and is rewritten whole; the text
around it is left alone. A results file's "header" (command, machine, GPU, driver, versions, commit, date), where it
has one, names the machine a row ran on. `--check` writes nothing and exits 1 when a table is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCUMENTS = (REPO / "README.md", REPO / "bench" / "README.md")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def machine_of(result: dict, fallback: str) -> str:
    """The GPU a result ran on: its header's where it has one."""
    header = result.get("header")
    return header["gpu"] if header and header.get("gpu") else fallback


def _n(value: float, decimals: int = 0) -> str:
    return f"{value:,.{decimals}f}"


MODELS = {"7b": "Qwen2.5-7B QLoRA", "1.5b": "Qwen2.5-1.5B LoRA"}


def _peer_rows(name: str = "trainer_peers.json"):
    """A peers file's rows, 7B first, each with its arms and samebox's speed and peak-memory ratios to
    unsloth's."""
    for row in sorted(load(name)["rows"], key=lambda r: (r["model"] != "7b", r["mix"])):
        arms = row["arms"]
        speed = arms["samebox"]["label_tokens_per_s"] / arms["unsloth"]["label_tokens_per_s"]
        memory = arms["samebox"]["peak_allocated_gib"] / arms["unsloth"]["peak_allocated_gib"]
        yield row, arms, speed, memory


def _tok_s(arms: dict, arm: str) -> str:
    return _n(arms[arm]["label_tokens_per_s"])


def _peaks(arms: dict) -> str:
    return f"({arms['samebox']['peak_allocated_gib']:.2f} vs {arms['unsloth']['peak_allocated_gib']:.2f})"


def peers_table() -> str:
    """samebox against unsloth, HF padding-free and the recipe, one row per model and mix."""
    lines = ["| model, data | samebox label tok/s | unsloth | HF Trainer, padding-free | samebox vs unsloth: "
             "speed / peak memory (GiB) |", "|---|---|---|---|---|"]
    mixes = {"chat": "multi-turn chat", "short": "short rows"}
    for row, arms, speed, memory in _peer_rows():
        lines.append(
            f"| {MODELS[row['model']]}, {mixes[row['mix']]} | **{_tok_s(arms, 'samebox')}** "
            f"| {_tok_s(arms, 'unsloth')} | {_tok_s(arms, 'hf_padding_free')} "
            f"| {speed:.2f}x / {memory:.2f}x {_peaks(arms)} |")
    return "\n".join(lines)


def peers_detail_table() -> str:
    """The peers table with the recipe arm and each row's run, for bench/README.md."""
    lines = ["| model | mix (run) | samebox label tok/s | unsloth | HF padding-free | recipe | samebox vs unsloth | "
             "memory vs unsloth (peak allocated GiB) |", "|---|---|---|---|---|---|---|---|"]
    for row, arms, speed, memory in _peer_rows():
        recipe = _tok_s(arms, "recipe") if "recipe" in arms else "—"
        lines.append(
            f"| {MODELS[row['model']]} | {row['mix']} ({row['run']}) | **{_tok_s(arms, 'samebox')}** "
            f"| {_tok_s(arms, 'unsloth')} | {_tok_s(arms, 'hf_padding_free')} "
            f"| {recipe} | {speed:.2f}x | {memory:.2f}x {_peaks(arms)} |")
    return "\n".join(lines)


def peers_h100_table() -> str:
    """trainer_peers_h100.json: samebox against unsloth on one H100 (no flash-attn in either arm), with start-up."""
    result = load("trainer_peers_h100.json")
    mixes = {"chat": "multi-turn chat", "short": "short rows"}
    lines = ["| model, data | samebox label tok/s | unsloth | speed | peak memory (GiB) | samebox to step 1 s "
             "(first, second start) | unsloth (first) |", "|---|---|---|---|---|---|---|"]
    first = {(s["model"], s["mix"], s["arm"]): s["to_step_1_s"] for s in result["run_a"]["startup"]}
    for row, arms, speed, memory in _peer_rows("trainer_peers_h100.json"):
        start = "—"
        if row["mix"] == "short":  # each arm's first mix: samebox's second start, after run A's first
            start = (f"{first[(row['model'], 'short', 'samebox')]:.1f} first, "
                     f"{arms['samebox']['startup']['seconds_to']['step_1']:.1f} second")
        peer_start = f"{first[(row['model'], 'short', 'unsloth')]:.1f}" if row["mix"] == "short" else "—"
        lines.append(f"| {MODELS[row['model']]}, {mixes[row['mix']]} | **{_tok_s(arms, 'samebox')}** "
                     f"| {_tok_s(arms, 'unsloth')} | {speed:.2f}x | {memory:.2f}x {_peaks(arms)} | {start} "
                     f"| {peer_start} |")
    return "\n".join(lines)


def headline_table() -> str:
    """One line per headline measurement, each naming its file."""
    multigpu = load("multigpu.json")
    boot = load("bootstrap_gpu.json")
    flash = load("flash_attn_build.json")
    quick = load("selftest_gpu.json")["quick_2026_11_26_b"]["runs"][0]
    serve = {(r["arm"], r["clients"]): r for r in load("serve_gpu.json")["rows"]}
    check = load("gpu_check.json")
    rows = [
        ("two GPUs vs one (DDP, 7B QLoRA)", f"{multigpu['speedup_2gpu']:.2f}x label tok/s", "multigpu.json"),
        ("`bash setup.sh`, fresh instance, warm wheel cache, offline",
         f"{boot['first_run']['seconds_to_selftest_passed']:.0f} s to \"selftest passed\"; re-run "
         f"{boot['second_run']['seconds_total']:.0f} s, changed nothing", "bootstrap_gpu.json"),
        ("flash-attn wheel, cache hit + install", f"{flash['cache_hit_install']['seconds']:.1f} s",
         "flash_attn_build.json"),
        ("flash-attn sm_90 source build, 16 cores, slim / lean",
         f"{flash['builds']['slim']['build_step_s']:.0f} s / {flash['builds']['lean']['build_step_s']:.0f} s",
         "flash_attn_build.json"),
        ("`samebox selftest --quick`, one H100", f"{quick['quick']['wall_s']:.1f} s", "selftest_gpu.json"),
        (f"`samebox selftest --quick`, `bench/gpu_check.sh` ({machine_of(check, 'H100')})",
         f"{check['quick']['seconds']:.1f} s, exit {check['quick']['exit']}", "gpu_check.json"),
        ("`samebox serve`, 32 clients at once (1.5B + LoRA)",
         f"{serve[('serve-continuous', 32)]['tokens_per_s']:.0f} tok/s, first token "
         f"{serve[('serve-continuous', 32)]['ttft_ms_p50'] / 1000:.2f} s; plain generate one after another "
         f"{serve[('generate-sequential', 8)]['tokens_per_s']:.0f} tok/s", "serve_gpu.json"),
    ]
    lines = ["| what | result | file |", "|---|---|---|"]
    lines += [f"| {what} | {result} | bench/results/{name} |" for what, result, name in rows]
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"peers": peers_table, "peers-detail": peers_detail_table,
                                        "peers-h100": peers_h100_table, "headline": headline_table}


def render(text: str) -> str:
    """The text with every marked table rewritten from the results files."""
    def table(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            sys.exit(f"results: no table named {name!r}; known: {', '.join(sorted(TABLES))}")
        return f"<!-- results:{name} -->\n{TABLES[name]()}\n<!-- /results:{name} -->"
    return re.sub(r"<!-- results:([\w-]+) -->\n.*?<!-- /results:\1 -->", table, text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"results: {path} {'is out of date' if args.check else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
