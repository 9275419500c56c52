"""Printing for commands: aligned text tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(obj: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(obj, out, indent=2, sort_keys=True, default=str)
    out.write("\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def slowest(timings: dict[str, Any], count: int = 4) -> str:
    """'flash_attn 3.1 s, load 2.0 s, ...': where a run's time went (probes on background threads overlap others)."""
    top = sorted(((v, k) for k, v in timings.items() if isinstance(v, (int, float))), reverse=True)[:count]
    return ", ".join(f"{k} {v:.1f} s" for v, k in top)
