"""Shared test fixtures. Tests that need Docker or a GPU carry a marker; see tests/harness.py for Docker."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory, monkeypatch):
    """Each test keeps samebox's state (the file-check cache, setup's records) out of the real ~/.samebox, where one
    test's findings would become another's."""
    if "SAMEBOX_STATE" not in os.environ:
        monkeypatch.setenv("SAMEBOX_STATE", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _bitsandbytes_visible_again():
    """A process that quantizes nothing hides bitsandbytes for good (trainer/model/load.py hide_bitsandbytes); the
    test process trains unquantized and NF4 models alike, so after each test it is visible again, and the answers
    peft and transformers cached while it was hidden are forgotten."""
    yield
    if "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None:
        return
    del sys.modules["bitsandbytes"]
    for module, names in (("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                          ("transformers.utils.import_utils", ("is_bitsandbytes_available",))):
        for name in names:
            cached = getattr(sys.modules.get(module), name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
