"""The fused-layers check: a warning, never a failure (the trainer falls back on its own), saying what is slower."""

from __future__ import annotations

import pytest

from builder.selftest import checks_kernels


def reading(fused):
    return {"torch": {"cuda_available": True}, "fused_layers": fused}


GOOD = {"liger": {"installed": True, "rel_err": 2.3e-3},
        "attention": {"flash_attn": 4.6e-3, "torch_varlen": 4.6e-3, "sdpa": 4.1e-3}}


@pytest.mark.parametrize("fused,severity,words", [
    (GOOD, "ok", "Liger kernels within 2.3e-03"),
    ({**GOOD, "liger": {"installed": False, "error": "No module named 'liger_kernel'"}}, "warn", "not installed"),
    ({**GOOD, "liger": {"installed": True, "rel_err": 0.4}}, "warn", "failed their check"),
    ({**GOOD, "attention": {"sdpa": 4e-3}}, "warn", "samples attend one at a time"),
    ({**GOOD, "attention": {"flash_attn": "RuntimeError: no kernel image", "sdpa": 4e-3}}, "warn", "no varlen"),
    ({"probe_error": "RuntimeError: CUDA error"}, "warn", "crashed"),
    ({"not_needed": True}, "n/a", "not tested"),
])
def test_fused_layers_finding(fused, severity, words):
    finding = checks_kernels.fused_layers(reading(fused))
    assert finding.severity == severity and words in finding.message
