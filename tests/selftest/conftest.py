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


Edit = Callable[[dict[str, Any]], None]
