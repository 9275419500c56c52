"""What a new user hit on a first run, each kept fixed: `make demo` end to end; checks that fail fast (resume, the
export's output path) before any weights load; no empty directories left by a run that failed its checks; every
config problem at once; data errors that name the absolute path and the real position; no bitsandbytes on a run
that does not quantize; `samebox serve` of a missing path; files written 0644; `samebox train --json`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

DEMO = REPO / "configs" / "demo"


# --- make demo ----------------------------------------------------------------------------------------------------


def test_make_demo_runs_the_demo_script():
    proc = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "configs/demo/demo.py" in proc.stdout.splitlines()[-1]


def test_the_demo_config_loads_and_says_how_to_run_it():
    from trainer.config import load_config

    path = DEMO / "demo.yaml"
    assert path.read_text().startswith("# samebox train configs/demo/demo.yaml --no-preflight")
    cfg = load_config(path)
    assert (REPO / cfg.data.path).is_file() and cfg.model.quantization == "none"
    assert cfg.output.dir.startswith(".demo/") and ".demo/" in (REPO / ".gitignore").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_the_demo_trains_serves_and_gets_an_answer(tmp_path):
    """What `make demo` runs, into a scratch directory: exit 0, an HTTP 200 answer, the run's adapter on disk."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(DEMO / "demo.py"), "--work", str(tmp_path / "demo")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo: asked 'reverse: red cat moon': HTTP 200" in proc.stdout
    answer = next(line for line in proc.stdout.splitlines() if line.startswith("demo: answer"))
    assert answer.rstrip().endswith("'") and not answer.rstrip().endswith("''")  # a non-empty answer
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
