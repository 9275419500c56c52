"""bench/serve_gpu.py --smoke: every arm runs on the CPU (a tiny model, `samebox serve` in a subprocess) and the
JSON has the shape the GPU run commits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_measures_every_arm(tmp_path):
    out = tmp_path / "serve_smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_gpu.py"), "--smoke", "--clients", "1,2",
                           "--max-tokens", "4", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["engine"].startswith("transformers")
    arms = {(r["arm"], r["clients"]) for r in result["rows"]}
    assert arms == {(a, n) for a in ("generate-sequential", "generate-batched", "serve-continuous", "serve-off")
                    for n in (1, 2)}
    for row in result["rows"]:
        assert 0 < row["tokens"] <= 4 * row["clients"], row
        # Both are rounded to 0.1 ms (seen: a 4-token CPU answer whose first token came at its end, 11.4 ms of a
        # wall rounded to 11 ms): allow the two roundings' sum, no more.
        assert row["tokens_per_s"] > 0 and 0 < row["ttft_ms_p50"] <= row["ttft_ms_max"]
        assert row["ttft_ms_max"] <= row["wall_s"] * 1000 + 0.1 + 1e-9, row
