"""Readings fixtures: recorded from GPU machines (tests/fixtures/nvml/) and edited copies for each fault."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from builder.selftest.findings import Finding
from builder.selftest.registry import judge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nvml"


def load_readings(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def healthy() -> dict[str, Any]:
    """A healthy H100's quick-mode readings (a fresh deep copy: tests edit it to inject one fault)."""
    return copy.deepcopy(load_readings("healthy_quick"))


@pytest.fixture
def healthy_full() -> dict[str, Any]:
    return copy.deepcopy(load_readings("healthy_full"))


def findings(readings: dict[str, Any], check: str) -> list[Finding]:
    found = [f for f in judge(readings) if f.check == check]
    assert found, f"check {check} reported nothing"
    return found


def only(readings: dict[str, Any], check: str) -> Finding:
    found = findings(readings, check)
    assert len(found) == 1, found
    return found[0]


def severities(readings: dict[str, Any], check: str) -> list[str]:
    return [f.severity for f in findings(readings, check)]


def assert_fault_caught(readings: dict[str, Any], fault: tuple[Any, ...]) -> None:
    """A FAULTS-table row (id, edit, check, severity, message text, remediation text): apply the edit to
    ``readings``; the check must report that severity with that text and say what to do."""
    _, edit, check, severity, message, remediation = fault
    edit(readings)
    found = findings(readings, check)
    hits = [f for f in found if f.severity == severity and message in f.message]
    assert hits, found
    assert remediation in hits[0].remediation
    if severity in ("fail", "warn"):
        assert hits[0].remediation, "every fail and warn says what to do"


Edit = Callable[[dict[str, Any]], None]
