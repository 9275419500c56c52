"""The order a flash-attn build compiles its objects in, and how a build spent its time.

ninja starts objects in the order setup.py lists them; upstream lists the light forward kernels first and the
split-KV and backward kernels after them, so the heaviest objects start last and run on while cores idle.
``reorder_sources`` lists the heaviest first (longest-processing-time order, from the measured cost of each
kernel family), which changes what runs when, never what is compiled.

    python -m builder.wheels.schedule BUILD_DIR/.ninja_log [--json]

prints the wall time from the first start to the last end, the CPU-seconds of all objects (one nvcc job is one
core), how many jobs ran on average, and the longest objects: what bounds a build's tail.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# One kernel source in setup.py's list, e.g. `    "csrc/flash_attn/src/flash_bwd_hdim128_bf16_causal_sm80.cu",`
_KERNEL_LINE = re.compile(r'^\s*"csrc/flash_attn/src/flash_(fwd_split|fwd|bwd)_hdim(\d+)_\w+\.cu",\s*$')
# Mean seconds per object of each family: flash-attn 2.8.3 slim sm_90 on 16 cores, 16 jobs (bench/results/
# flash_attn_build.json): split-KV forward 118, backward 107, forward 78. Ties go to the larger head dim.
FAMILY_COST = {"fwd_split": 118.0, "bwd": 107.0, "fwd": 78.0}


def kernel_cost(line: str) -> tuple[float, int] | None:
    """Sort key of one setup.py source line (larger: start earlier), or None for a line that is no kernel."""
    m = _KERNEL_LINE.match(line)
    return (FAMILY_COST[m.group(1)], int(m.group(2))) if m else None


def reorder_sources(setup_py: str) -> tuple[str, int]:
    """setup.py's text with each contiguous run of kernel source lines sorted heaviest first; returns the text
    and how many lines changed place (0: a layout this does not know, left as it was)."""
    lines = setup_py.splitlines(keepends=True)
    out: list[str] = []
    moved = 0
    i = 0
    while i < len(lines):
        if kernel_cost(lines[i]) is None:
            out.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and kernel_cost(lines[j]) is not None:
            j += 1
        run = lines[i:j]
        ordered = sorted(run, key=lambda line: kernel_cost(line), reverse=True)  # type: ignore[arg-type,return-value]
        moved += sum(a != b for a, b in zip(run, ordered, strict=True))
        out.extend(ordered)
        i = j
    return "".join(out), moved


def simulate(durations: list[float], jobs: int) -> float:
    """Wall time of running ``durations`` in list order on ``jobs`` slots, each taking the first free one
    (ninja's scheduling when every object is ready at the start)."""
    free = [0.0] * jobs
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) if durations else 0.0


@dataclass(frozen=True)
class Entry:
    start_ms: int
    end_ms: int
    output: str

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000

    @property
    def name(self) -> str:
        return Path(self.output).name.removesuffix(".o")


def read_ninja_log(path: Path) -> list[Entry]:
    """The entries of the last build recorded in ``path`` (ninja log v5-v7: start, end, mtime, output, hash)."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("# ninja log v"):
        raise ValueError(f"{path} is not a ninja log (no '# ninja log vN' header)")
    by_output: dict[str, Entry] = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 5:
            continue
        start, end, output = int(fields[0]), int(fields[1]), fields[3]
        if start == 0 and by_output and min(e.start_ms for e in by_output.values()) > 0:
            by_output.clear()  # a later build: ninja's clock starts again at 0
        by_output[output] = Entry(start, end, output)
    return sorted(by_output.values(), key=lambda e: (e.start_ms, e.output))


def summarise(entries: list[Entry], top: int = 10) -> dict[str, object]:
    if not entries:
        return {"objects": 0}
    wall = (max(e.end_ms for e in entries) - min(e.start_ms for e in entries)) / 1000
    cpu = sum(e.seconds for e in entries)
    longest = sorted(entries, key=lambda e: -e.seconds)[:top]
    return {
        "objects": len(entries),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "mean_parallel_jobs": round(cpu / wall, 1) if wall else None,
        "longest": [{"object": e.name, "seconds": round(e.seconds, 1), "start_s": round(e.start_ms / 1000, 1)}
                    for e in longest],
    }


def nvcc_phase_seconds(csv_path: Path) -> dict[str, float]:
    """CPU-seconds per compile phase (cicc, ptxas, the host compiler ...) summed over every object, from the
    table ``nvcc --time FILE`` appends to (columns: source, phase, inputs, output, arch, tool, metric, unit)."""
    totals: dict[str, float] = {}
    for row in csv.reader(csv_path.read_text().splitlines()[1:]):
        if len(row) < 8 or row[7].strip() != "ms":
            continue
        phase = row[1].strip()
        totals[phase] = totals.get(phase, 0.0) + float(row[6]) / 1000
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.wheels.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("ninja_log", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = summarise(read_ninja_log(args.ninja_log))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['objects']} objects: {report['wall_s']} s wall, {report['cpu_s']} CPU-s, "
          f"{report['mean_parallel_jobs']} jobs on average")
    for item in report.get("longest", []):
        print(f"  {item['seconds']:7.1f} s  from {item['start_s']:6.1f} s  {item['object']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
