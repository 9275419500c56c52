"""bench/multigpu_train.py --shard on the CPU: the one-card part runs through the capping launcher (no CUDA here,
so no cap: recorded as skipped, and the part trains), two gloo processes under train.shard=fsdp give the
one-process losses, and the run stopped by SIGTERM resumes onto the same curve. Plus the launcher's pieces that the
32B run on GPUs leans on: the error line it reports and the cut-off model copy it writes again."""

from __future__ import annotations

import json
import subprocess
import sys

import multigpu_train as mg
import pytest

from tests.conftest import REPO

STEPS = 8  # the smoke's steps


@pytest.fixture(scope="module")
def sharded_smoke(tmp_path_factory) -> tuple[dict, int, str]:
    tmp = tmp_path_factory.mktemp("multigpu")
    out = tmp / "multigpu_sharded.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "multigpu_train.py"), "--smoke", "--shard",
                           "--gib-per-gpu", "23.5", "--workdir", str(tmp / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_sharded_smoke_gives_the_one_process_losses(sharded_smoke):
    result, rc, output = sharded_smoke
    assert rc == 0 and not result["errors"], (result["errors"], output[-3000:])
    one, sharded = result["one_card"], result["sharded"]
    # Really one process unsharded against two sharded ones, as the runs' own summaries say.
    assert one["summary"]["shard"] == "none" and sharded["summary"]["shard"] == "fsdp"
    assert "--nproc_per_node 2" in sharded["launch"]["argv"] and "torch.distributed.run" not in one["launch"]["argv"]
    assert len(one["losses"]) == len(sharded["losses"]) == STEPS
    assert one["label_tokens"] == sharded["label_tokens"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(sharded["losses"], one["losses"], strict=True))
    assert worst <= mg.TOLERANCE, (one["losses"], sharded["losses"])
    assert result["loss_curves"]["within"] and result["loss_curves"]["steps"] == STEPS
    assert result["loss_curves"]["max_rel_diff"] == pytest.approx(worst)
    assert sharded["losses"][-1] < sharded["losses"][0]  # it learned, so equal curves say something
    assert result["verdict"]["sharded"] == {"exit": 0, "steps_trained": STEPS, "trained_every_step": True}


@pytest.mark.slow
def test_one_card_part_records_its_exit_and_the_skipped_cap(sharded_smoke):
    result, _, _ = sharded_smoke
    one = result["one_card"]
    assert isinstance(one["launch"]["exit"], int)
    verdict = result["verdict"]["one_card"]
    assert verdict["exit"] == one["launch"]["exit"] and verdict["steps_trained"] == len(one["losses"])
    # No CUDA on this machine: the cap is skipped and said so; the GPU run's "do not fit" cannot happen here.
    assert not verdict["did_not_fit"]
    assert verdict["memory_cap"].startswith("skipped: no CUDA")
    ranks = one["launch"]["ranks"]
    assert [r["rank"] for r in ranks] == [0] and ranks[0]["exit"] == one["launch"]["exit"]


@pytest.mark.slow
def test_every_sharded_rank_records_its_cap_exit_and_load_time(sharded_smoke):
    result, _, _ = sharded_smoke
    sharded = result["sharded"]
    ranks = sharded["launch"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["exit"] == 0 for r in ranks)
    assert all(r["memory_cap"].startswith("skipped: no CUDA") for r in ranks)
    assert all(0 < r["seconds"]["load"] <= r["seconds"]["setup"] < r["seconds"]["process"] for r in ranks)
    assert sharded["load_s_per_rank"] == [r["seconds"]["load"] for r in ranks]
    assert len(sharded["peak_mem_gib_per_rank"]) == 2 and len(sharded["mem_gib"]) == STEPS
    prep = result["prepare"]
    assert prep["exit"] == 0 and prep["s"] > 0 and prep["safetensors_files"] >= 1 and not prep["reused"]


@pytest.mark.slow
def test_the_sharded_run_resumes_onto_its_uninterrupted_curve(sharded_smoke):
    result, _, _ = sharded_smoke
    first, second = result["interrupted"]["launches"]
    # torchrun itself ends in 1 once signalled; its workers stop cleanly after checkpointing (their records say so).
    assert 0 < first["sigterm_after_step"] < STEPS and [r["exit"] for r in first["ranks"]] == [0, 0]
    assert second["exit"] == 0 and [r["exit"] for r in second["ranks"]] == [0, 0]
    assert "--resume auto" in second["argv"]
    assert result["interrupted"]["summary"]["shard"] == "fsdp"
    assert result["resumed_vs_uninterrupted"]["within"] and result["resumed_vs_uninterrupted"]["steps"] == STEPS


def test_error_line_is_samebox_error_before_a_traceback():
    text = ("loading...\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
            "torch.OutOfMemoryError: CUDA out of memory\n"
            "[rank0]: samebox: error: the weights of /m (nf4) do not fit one GPU (H100: 79.1 GiB)\n"
            "shard it over 2 GPUs\n")
    assert mg.error_line(text) == "samebox: error: the weights of /m (nf4) do not fit one GPU (H100: 79.1 GiB)"
    assert mg.DID_NOT_FIT in mg.error_line(text)
    assert mg.error_line(text.split("[rank0]")[0]) == "torch.OutOfMemoryError: CUDA out of memory"
    assert mg.error_line("step 1/6 | loss 6.9\n") is None


def test_a_cut_off_model_copy_is_written_again_and_a_complete_one_reused(tmp_path, monkeypatch):
    calls = []
    real_run = subprocess.run

    def fake_run(argv, **kwargs):
        if argv[0] == "rm":
            return real_run(argv, check=True)
        calls.append(argv)
        model = tmp_path / "model-smoke"
        model.mkdir(exist_ok=True)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (model / name).write_text("x")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(mg.subprocess, "run", fake_run)
    opts = mg.argparse.Namespace(size="smoke", samples=4, median=10, cap=16)
    model = tmp_path / "model-smoke"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the weights' write was cut off: no tokenizer yet
    (model / "stale.safetensors").write_text("half")
    record = mg.prepare(opts, tmp_path, deadline=mg.time.monotonic() + 60)
    assert record["removed_incomplete_copy"] and not record["reused"] and record["exit"] == 0
    assert not (model / "stale.safetensors").exists() and len(calls) == 1
    again = mg.prepare(opts, tmp_path, deadline=mg.time.monotonic() + 60)
    assert again["reused"] and "removed_incomplete_copy" not in again and again["safetensors_files"] == 1


@pytest.mark.slow
def test_ddp_smoke_says_where_each_ranks_time_went(tmp_path):
    """The DDP parts on the CPU (gloo): the two-process curve is the one-process curve, each part says per rank how
    a step split into compute, all-reduce and host time, and --set reaches every part's train config."""
    out = tmp_path / "multigpu_train.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "multigpu_train.py"), "--smoke", "--parts",
                           "one_gpu,gpus", "--set", "output.log_every_steps=3", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and not result["errors"], result["errors"]
    assert "interrupted" not in result and result["loss_curves"]["within"]
    for name, world in (("one_gpu", 1), ("2_gpus", 2)):
        written = (tmp_path / "work" / f"{name}.yaml").read_text()
        assert "log_every_steps: 3" in written
        went = result[name]["time"]
        assert went["steps"] == STEPS - 1  # the warm-up step left out
        for key in ("step_s", "compute_s", "reduce_s", "host_s"):
            assert len(went[key]) == world
        for step_s, compute_s, host_s in zip(went["step_s"], went["compute_s"], went["host_s"], strict=True):
            assert 0 < compute_s < step_s and host_s >= 0
    scaling = result["scaling"]
    assert scaling["work_ratio"] > 0 and scaling["compute_bound_speedup"] > 0
    assert len(scaling["compute_s_per_rank"]) == 2


def test_set_and_parts_are_checked_before_anything_runs(tmp_path):
    for argv, said in ((["--set", "offload=false"], "SECTION.KEY=VALUE"), (["--set", "a.b.c=1"], "SECTION.KEY"),
                       (["--set", "train.shard=fsdp"], "each part sets its own"), (["--parts", "sharded"], "subset of"),
                       (["--gib-per-gpu", "16"], "goes with --shard")):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "multigpu_train.py"), "--out",
                               str(tmp_path / "x.json"), *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
        assert not (tmp_path / "x.json").exists()
