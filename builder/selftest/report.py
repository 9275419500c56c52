"""The self-test report: findings plus a machine summary; as a table for people, and as JSON whose schema is
``JSON_SCHEMA`` (documented in docs/selftest.md; ``schema_problems`` checks a dict against it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from builder.core.output import format_table, slowest
from builder.selftest.findings import FAIL, SEVERITIES, Finding

SCHEMA_ID = "samebox.selftest/1"

_FINDING = {
    "type": "object",
    "required": ["check", "group", "severity", "message", "remediation"],
    "properties": {
        "check": {"type": "string"},
        "group": {
            "type": "string",
            "enum": ["identity", "health", "numerics", "interconnect", "kernels", "environment", "trainer"],
        },
        "severity": {"type": "string", "enum": list(SEVERITIES)},
        "message": {"type": "string"},
        "remediation": {"type": "string"},
    },
}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "type": "object",
    "required": ["schema", "mode", "failed", "summary", "duration_s", "machine", "model", "findings", "timings"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_ID]},
        "mode": {"type": "string", "enum": ["quick", "full"]},
        "failed": {"type": "boolean"},
        "summary": {
            "type": "object",
            "required": list(SEVERITIES),
            "properties": {s: {"type": "integer"} for s in SEVERITIES},
        },
        "duration_s": {"type": "number"},
        "machine": {
            "type": "object",
            "required": ["gpus", "driver", "cuda_driver", "torch", "torch_cuda"],
            "properties": {
                "gpus": {"type": "array", "items": {"type": "string"}},
                "driver": {"type": ["string", "null"]},
                "cuda_driver": {"type": ["string", "null"]},
                "torch": {"type": ["string", "null"]},
                "torch_cuda": {"type": ["string", "null"]},
            },
        },
        "model": {
            "type": "object",
            "required": ["source", "head_dims", "dtype", "window", "features"],
            "properties": {
                "source": {"type": "string"},
                "head_dims": {"type": "array", "items": {"type": "integer"}},
                "dtype": {"type": "string"},
                "window": {"type": ["integer", "null"]},
                "features": {"type": "array", "items": {"type": "string"}},
            },
        },
        "findings": {"type": "array", "items": _FINDING},
        "timings": {"type": "object"},
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "number": (int, float),
    "integer": int,
    "null": type(None),
}


def schema_problems(value: Any, schema: dict[str, Any] = JSON_SCHEMA, where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the subset of JSON Schema used above: type, enum, required,
    properties, items)."""
    types = schema.get("type")
    if types:
        allowed = types if isinstance(types, list) else [types]
        if not any(
            isinstance(value, _TYPES[t]) and not (t in ("number", "integer") and isinstance(value, bool))
            for t in allowed
        ):
            return [f"{where}: expected {' or '.join(allowed)}, got {type(value).__name__}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        problems += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                problems += schema_problems(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{where}[{i}]")
    return problems


@dataclass
class Report:
    """The findings of one run, with the readings they were judged on."""

    mode: str
    findings: list[Finding]
    readings: dict[str, Any] = field(repr=False)
    duration_s: float = 0.0

    @property
    def failed(self) -> bool:
        return any(f.severity == FAIL for f in self.findings)

    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {s: c.get(s, 0) for s in SEVERITIES}

    def machine(self) -> dict[str, Any]:
        nvml, torch = self.readings.get("nvml") or {}, self.readings.get("torch") or {}
        return {
            "gpus": [d["name"] for d in nvml.get("devices") or []],
            "driver": nvml.get("driver_version"),
            "cuda_driver": nvml.get("cuda_driver_version"),
            "torch": torch.get("version"),
            "torch_cuda": torch.get("cuda"),
        }

    def to_dict(self, with_readings: bool = False) -> dict[str, Any]:
        d = {
            "schema": SCHEMA_ID,
            "mode": self.mode,
            "failed": self.failed,
            "summary": self.counts(),
            "duration_s": round(self.duration_s, 2),
            "machine": self.machine(),
            "model": self.readings.get("model") or {},
            "findings": [f.to_dict() for f in self.findings],
            "timings": self.readings.get("timings") or {},
        }
        if with_readings:
            d["readings"] = self.readings
        return d

    def summary_line(self) -> str:
        c = self.counts()
        verdict = "FAILED" if self.failed else "passed"
        reused = " (kernel checks reused from a pass on this boot)" if self.readings.get("reused") else ""
        return (
            f"selftest {self.mode} {verdict} in {self.duration_s:.1f}s: {c['ok']} ok, {c['warn']} warn, "
            f"{c['fail']} fail, {c['n/a']} n/a{reused}"
        )

    def format(self) -> str:
        rows = [(f.severity.upper(), f.check, f.message) for f in self.findings]
        lines = [format_table(("result", "check", "finding"), rows), ""]
        todo = [f for f in self.findings if f.severity in ("fail", "warn") and f.remediation]
        if todo:
            lines.append("what to do:")
            lines += [f"  [{f.severity}] {f.check}: {f.remediation}" for f in todo]
            lines.append("")
        took = slowest(self.readings.get("timings") or {})
        if took:
            lines.append(f"slowest probes: {took}")
        lines.append(self.summary_line())
        return "\n".join(lines)
