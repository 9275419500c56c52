"""Shared test fixtures. Tests that need Docker or a GPU carry a marker; see tests/harness.py for Docker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except in CI, where the missing prerequisite is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}: CI must provide it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def repo() -> Path:
    return REPO
