"""The registry's declarations hold: every probe a check names has a recorded reading in the fixtures, every
fixture key is a declared probe, and a check's modes alone decide where it is judged and its probe is run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from builder.core.attention_needs import attention_needs
from builder.selftest import probes, readings, registry
from builder.selftest.findings import ok
from builder.selftest.probes import GPU_STAGES, PROBES, Probe
from builder.selftest.registry import CHECKS, MODES, Check
from tests.selftest.conftest import FIXTURES

# What a run records besides its probes' readings (collect) and what a capture adds (bench/selftest_gpu.py).
CONTEXT_KEYS = {"readings_version", "mode", "model", "kernels", "timings", "process", "fixture_source",
                "capture_seconds"}


def recorded() -> dict[str, dict[str, Any]]:
    """Every readings fixture (a whole run's readings, not a single probe's like flash_attn_slim.json)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}
    return {name: r for name, r in found.items() if "readings_version" in r}


def test_every_probe_a_check_names_has_a_recorded_reading() -> None:
    fixtures = recorded()
    assert {r["readings_version"] for r in fixtures.values()} == {readings.READINGS_VERSION}
    for probe in {c.probe for c in CHECKS if c.probe}:
        taken = [r[probe.name] for r in fixtures.values() if isinstance(r.get(probe.name), dict)]
        usable = [x for x in taken if "probe_error" not in x and x != probes.NOT_NEEDED]
        assert usable, f"no fixture in {FIXTURES} records a reading of probe {probe.name!r}"


@pytest.mark.parametrize("name", sorted(recorded()))
def test_every_fixture_key_is_a_declared_probe(name: str) -> None:
    """A probe renamed or removed leaves no reading behind that no check judges any more."""
    stale = set(recorded()[name]) - CONTEXT_KEYS - {p.name for p in PROBES}
    assert not stale, f"{name}.json has readings no probe declares: {sorted(stale)}"


def test_every_check_names_a_declared_probe_and_known_modes() -> None:
    assert {c.probe for c in CHECKS if c.probe} <= set(PROBES)
    assert all(c.modes and c.modes <= set(MODES) for c in CHECKS)
    assert len({p.name for p in PROBES}) == len(PROBES)


@pytest.fixture
def one_mode_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A registry of two checks, each on its own probe: one quick-only, one full-only. Returns the probes that
    ran."""
    ran: list[str] = []

    def probe(name: str) -> Probe:
        return Probe(name, probes.MEMORY, lambda c: ran.append(name) or {"mode": c.mode})

    quick, full = probe("quick_probe"), probe("full_probe")
    monkeypatch.setattr(probes, "PROBES", (*PROBES, quick, full))
    monkeypatch.setattr(registry, "CHECKS", (
        Check("quick_only", "numerics", quick, lambda r: ok(f"judged {r.get('quick_probe')}"), frozenset({"quick"})),
        Check("full_only", "numerics", full, lambda r: ok(f"judged {r.get('full_probe')}"), registry.FULL),
    ))
    return ran


@pytest.mark.parametrize("mode", MODES)
def test_a_check_of_one_mode_is_judged_and_probed_only_in_that_mode(mode, one_mode_checks, recorder) -> None:
    other = {"quick": "full", "full": "quick"}[mode]
    r = readings.collect(mode, attention_needs(None))
    assert one_mode_checks == [f"{mode}_probe"]
    assert f"{mode}_probe" in r and f"{other}_probe" not in r
    judged = {f.check: f.message for f in registry.judge(r)}
    assert judged == {f"{mode}_only": f"judged {{'mode': '{mode}'}}"}


@pytest.mark.parametrize("mode", MODES)
def test_the_collector_runs_exactly_the_probes_of_the_modes_checks(mode, recorder) -> None:
    """The full-only checks' probes (memory pattern, repeatability, the LoRA smoke run and its imports) run in
    full and nowhere else; every probe a check of the mode names runs (on a GPU machine)."""
    r = readings.collect(mode, attention_needs(None))
    named = {c.probe.name for c in CHECKS if c.probe and mode in c.modes}
    assert named <= set(r)
    gpu_probes = {p.name for p in PROBES if p.stage in GPU_STAGES}
    assert set(r) & gpu_probes == named & gpu_probes
    smoke_imports = {"import transformers", "import peft"}
    assert (smoke_imports <= set(recorder)) == (mode == "full")
    assert ("memory_pattern" in recorder) == (mode == "full")
