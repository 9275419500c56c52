"""`samebox train` under torchrun (2 processes, gloo on CPU): the 1-process loss curve, rank 0 writes, SIGTERM + resume.

Two launches of the real command: the first is stopped by SIGTERM to the launcher, the second resumes with
--resume auto and is stopped the same way. Their stitched losses must equal a 1-process run with the same samples
per optimizer step: each rank's loss is divided by the whole step's label tokens and the gradients are summed, so
only float summation order differs (measured: relative 1e-7; allowed: 1e-5, while a missing gradient sum is off by
about 1e-2 from the second step on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer.loop.checkpoint import verify_checkpoint
from trainer.loop.distributed import Ranks, share_of_step
from trainer.loop.recipe import LoRAFinetuneRecipe

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # relative, per step


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _torchrun_until(config_file: Path, run_dir: Path, rows: int, *extra: str) -> str:
    """Launch 2 processes, SIGTERM the launcher once metrics.jsonl has ``rows`` rows; the combined output."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "builder", "train", str(config_file), "--no-preflight", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(_rows(run_dir)) < rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    # torchrun forwards SIGTERM to the workers, waits for them (30 s, --shutdown-timeout) and then re-raises the
    # signal as its own exit status 1; the workers' own exit codes show as ChildFailedError when not 0.
    assert "ChildFailedError" not in out, out[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_match_one_and_survive_sigterm(make_config, tmp_path):
    overrides = ("train.max_steps=100000", "output.save_every_steps=1000", "output.keep_last=5",
                 "train.samples_per_step=8", "train.micro_batch_tokens=256")
    cfg = make_config(overrides=overrides, name="ddp")
    run_dir = Path(cfg.output.dir)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))

    first = _torchrun_until(config_file, run_dir, 3)
    stopped = len(_rows(run_dir))
    assert f"stopped by signal at step {stopped};" in first and first.count("stopped by signal") == 1
    ckpt = run_dir / "checkpoints" / f"step-{stopped:08d}"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "optimizer.pt", "rng-0.pt",
        "rng-1.pt", "scheduler.pt", "trainer_state.json"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert verify_checkpoint(ckpt) is None  # the manifest holds both ranks' RNG files

    second = _torchrun_until(config_file, run_dir, stopped + 3, "--resume", "auto")
    assert f"resumed from {ckpt} at step {stopped}" in second
    rows = _rows(run_dir)
    ended = len(rows)
    # Rank 0 alone logs and prints: one metrics row and one progress line per step, steps in order.
    assert [r["step"] for r in rows] == list(range(1, ended + 1))
    assert all((first + second).count(f"step {s}/100000 |") == 1 for s in range(1, ended + 1))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"step-{stopped:08d}", f"step-{ended:08d}"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    # Each row says where every rank's step went (one collective per step carries them to rank 0).
    for r in rows:
        assert len(r["rank_step_s"]) == len(r["rank_compute_s"]) == len(r["rank_reduce_s"]) == 2
        assert r["rank_step_s"][0] == r["step_s"] and r["rank_compute_s"][0] == r["compute_s"]
        for step_s, compute_s, reduce_s in zip(r["rank_step_s"], r["rank_compute_s"], r["rank_reduce_s"], strict=True):
            assert 0 < compute_s and 0 <= reduce_s and compute_s + reduce_s <= step_s

    reference = LoRAFinetuneRecipe(make_config(overrides=overrides, name="one-process"))
    reference.setup()
    reference.model.train()
    expected = [reference._train_one() for _ in range(ended)]
    reference.cleanup()
    assert [r["label_tokens"] for r in rows] == [r["label_tokens"] for r in expected]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=TOLERANCE, abs=0)


def test_step_shares_cover_the_step_once_and_balance_tokens():
    lengths = [700, 50, 120, 300, 90, 10, 400, 650, 5]
    indices = [8, 3, 0, 6, 1, 7, 2]
    shares = [share_of_step(indices, lengths, Ranks(rank, 2)) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(indices)
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(lengths[i] for i in indices)
    assert share_of_step(indices, lengths, Ranks(0, 1)) == indices
    assert share_of_step([4], lengths, Ranks(1, 2)) == []


def test_exchange_on_one_process_and_the_step_clock():
    from trainer.loop.distributed import StepClock, exchange

    flags, per_rank = exchange([True, False], [1.5, 2.0], torch.device("cpu"), Ranks())
    assert flags == [True, False] and per_rank == [[1.5, 2.0]]
    clock = StepClock(torch.device("cpu"))
    clock.mark("a")
    time.sleep(0.01)
    clock.mark("b")
    assert 0.009 <= clock.span("a", "b") < 1.0


def _exchange_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed

    from trainer.loop.distributed import exchange

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = exchange([rank == 1, False], [float(rank) + 0.5, 10.0 * rank], torch.device("cpu"),
                          Ranks(rank, world))
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_exchange_ors_flags_and_gathers_each_ranks_values(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_exchange_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    for rank in range(2):
        flags, per_rank = json.loads((tmp_path / f"{rank}.json").read_text())
        assert flags == [True, False]  # rank 1's stop reaches rank 0
        assert per_rank == [[0.5, 0.0], [1.5, 10.0]]
