"""The all-reduce probe for real, on CPU: two gloo processes through the same code path NCCL takes on GPUs
(torch.multiprocessing, and torchrun's ranks), the deadline that turns a hang into a reading."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from builder.selftest.allreduce import local_allreduce
from tests.conftest import REPO


@pytest.mark.slow
def test_two_processes_sum_and_bandwidth() -> None:
    reading = local_allreduce(2, "gloo", size_mib=1, iters=3, timeout_s=120)
    assert "error" not in reading and not reading["timed_out"], reading
    assert reading["ranks_reported"] == [0, 1]
    assert reading["expected"] == 3.0 and reading["wrong_elements"] == 0
    assert reading["busbw_gbps"] > 0 and reading["busbw_gbps"] == reading["algbw_gbps"]  # 2(n-1)/n = 1 for n = 2
    # NVLink multicast is off in the spawned ranks unless the user set it.
    assert reading["nccl_env"].get("NCCL_NVLS_ENABLE") == os.environ.get("NCCL_NVLS_ENABLE", "0")


def test_deadline_turns_a_stuck_run_into_a_reading() -> None:
    """Two ranks that cannot finish within 0.3 s (starting Python and torch alone takes longer): the probe
    returns at its deadline, says timed_out, and leaves no rank running."""
    start = time.perf_counter()
    reading = local_allreduce(2, "gloo", size_mib=1, iters=3, timeout_s=0.3)
    assert reading["timed_out"] is True
    assert time.perf_counter() - start < 10
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_under_torchrun_uses_the_launchers_ranks(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "selftest" / "torchrun_allreduce.py"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    readings = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for reading in readings:
        assert reading["launcher"] == "torchrun" and reading["world_size"] == 2 and reading["nodes"] == 1
        assert reading["wrong_elements"] == 0 and not reading["timed_out"]


@pytest.mark.slow
def test_started_ranks_wait_for_run_before_they_measure() -> None:
    """start() spawns the ranks (Python and torch load meanwhile); they write nothing until run() lets them go."""
    from pathlib import Path

    from builder.selftest.allreduce import LocalAllreduce

    probe = LocalAllreduce(2, "gloo", size_mib=1, iters=3, timeout_s=120).start()
    time.sleep(3)
    assert probe.rendezvous is not None and list(Path(probe.rendezvous.name).glob("rank*.json")) == []
    reading = probe.run()
    assert reading["ranks_reported"] == [0, 1] and reading["wrong_elements"] == 0 and not reading["timed_out"]
    assert multiprocessing.active_children() == []
