"""How a flash-attn build spent its time, from ninja's log of each object's start and end.

    python -m builder.wheels.schedule BUILD_DIR/.ninja_log [--jobs N] [--json]

prints the wall time from the first start to the last end, the CPU-seconds of all objects (one nvcc job is one
core), how many jobs ran on average, the floor (CPU-seconds / jobs), what the same objects would take started
longest first, and the longest objects: what bounds a build's tail. ninja starts the objects in the order the
extension lists them, which setuptools sorts by name (flash_api, then flash_bwd_*, flash_fwd_*, flash_fwd_split_*).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import sys
from dataclasses import dataclass
from pathlib import Path


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
    last_end = 0
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 5:
            continue
        start, end, output = int(fields[0]), int(fields[1]), fields[3]
        if end < last_end or output in by_output:
            # Lines come in order of completion, each build's clock from 0: an earlier end, or an object seen
            # already, starts a later build's lines. (A log ninja has recompacted is out of order: not read here.)
            by_output.clear()
        last_end = end
        by_output[output] = Entry(start, end, output)
    return sorted(by_output.values(), key=lambda e: (e.start_ms, e.output))


def summarise(entries: list[Entry], jobs: int | None = None, top: int = 10) -> dict[str, object]:
    """``jobs``: the build's MAX_JOBS (default: the most objects that ran at once)."""
    if not entries:
        return {"objects": 0}
    wall = (max(e.end_ms for e in entries) - min(e.start_ms for e in entries)) / 1000
    cpu = sum(e.seconds for e in entries)
    jobs = jobs or max(1, max(sum(1 for o in entries if o.start_ms <= e.start_ms < o.end_ms) for e in entries))
    longest = sorted(entries, key=lambda e: -e.seconds)[:top]
    return {
        "objects": len(entries),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "mean_parallel_jobs": round(cpu / wall, 1) if wall else None,
        "jobs": jobs,
        "floor_s": round(cpu / jobs, 1),
        "longest_first_s": round(simulate(sorted((e.seconds for e in entries), reverse=True), jobs), 1),
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
    parser.add_argument("--jobs", type=int, help="the build's MAX_JOBS (default: the most objects run at once)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = summarise(read_ninja_log(args.ninja_log), args.jobs)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['objects']} objects: {report['wall_s']} s wall, {report['cpu_s']} CPU-s, "
          f"{report['mean_parallel_jobs']} of {report['jobs']} jobs on average; floor {report['floor_s']} s, "
          f"longest first {report['longest_first_s']} s")
    for item in report.get("longest", []):
        print(f"  {item['seconds']:7.1f} s  from {item['start_s']:6.1f} s  {item['object']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
