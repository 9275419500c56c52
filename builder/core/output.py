"""Printing for commands: aligned text tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
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


def text_value(value: Any) -> str:
    """One value as a person reads it, never a Python repr: - for none, yes/no, a list as its items joined with
    ', ', a mapping (or a list holding one) as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and any(
            isinstance(v, (Mapping, list, tuple)) for v in value)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        return ", ".join(text_value(v) for v in value) or "-"
    return str(value)


def format_fields(obj: Mapping[str, Any], prefix: str = "") -> str:
    """A (nested) mapping as `name: value` lines for people: nested keys joined with '.', multi-line text
    indented under its name."""
    lines = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            lines.append(format_fields(value, f"{name}."))
        elif isinstance(value, str) and "\n" in value:
            lines += [f"{name}:", *(f"  {line}" for line in value.splitlines())]
        else:
            lines.append(f"{name}: {text_value(value)}")
    return "\n".join(lines)
