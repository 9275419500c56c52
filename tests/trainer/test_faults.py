"""Checkpoints that cannot be lost: a disk that fills up during a save, a damaged newest checkpoint, a data file
changed under a run, a second run on an output.dir in use, and what a killed save leaves. Each fault is refused
(exit 2, saying what would work) before any data is tokenized or weight loaded, and no earlier checkpoint is touched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from builder.cli import main as cli_main
from tests.trainer.conftest import alpaca_rows, write_jsonl
from trainer.loop import checkpoint as ckpt
from trainer.loop.runlock import lock_run_dir

REPO = Path(__file__).resolve().parents[2]


def _config_file(make_config, tmp_path: Path, overrides: tuple[str, ...]) -> tuple[Path, Path]:
    """The run's YAML config and its output.dir."""
    cfg = make_config(overrides=overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path, Path(cfg.output.dir)


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _FillsUp(io.FileIO):
    """A file on a disk with ``room`` bytes left: what fits is written, then ENOSPC, as the kernel says it."""

    def __init__(self, path: str, room: int) -> None:
        super().__init__(path, "wb")
        self.room = room

    def write(self, b) -> int:
        data = bytes(b)
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        self.room -= len(data)
        return super().write(data)


def test_a_disk_full_during_a_save_keeps_the_previous_checkpoint_and_exits_2(make_config, tmp_path, monkeypatch,
                                                                             capsys):
    """The disk fills up half-way through step 4's optimizer state: the run stops with exit 2 saying how much a
    checkpoint takes and where, step 2 stays complete (keep_last=1 prunes only after a save succeeds), no
    unfinished copy stays, and --resume auto continues from step 2."""
    real_open = open

    def disk_full_in_step_4(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).parent.name == ".step-00000004.partial" and Path(file).name == "optimizer.pt":
            return _FillsUp(str(file), room=100)
        return real_open(file, mode, *args, **kwargs)

    config, run_dir = _config_file(make_config, tmp_path, ("train.max_steps=4", "output.save_every_steps=2",
                                                           "output.keep_last=1"))
    monkeypatch.setattr(ckpt, "open", disk_full_in_step_4, raising=False)
    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    kept = run_dir / "checkpoints" / "step-00000002"
    assert "checkpoint step-00000004 not saved (the unfinished copy is removed; the newest checkpoint, " \
           "step-00000002, is intact)" in err
    assert f"no space left on the device of {run_dir / 'checkpoints'} (a checkpoint takes about " \
           f"{ckpt._size(ckpt.checkpoint_bytes(kept))}; " in err
    assert "output.keep_last=1 checkpoints plus the one being written" in err and "--resume auto" in err
    assert "Traceback" not in err
    assert _entries(run_dir) == ["step-00000002"]  # no .partial left behind
    assert ckpt.verify_checkpoint(kept) is None

    monkeypatch.undo()
    assert cli_main(["train", str(config), "--no-preflight", "--resume", "auto"]) == 0
    assert f"resumed from {kept} at step 2" in capsys.readouterr().out
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert _entries(run_dir) == ["step-00000004"]


def test_resume_auto_skips_a_truncated_and_a_damaged_newest_checkpoint(make_config, tmp_path, capsys):
    config, run_dir = _config_file(make_config, tmp_path, ("train.max_steps=3", "output.save_every_steps=1",
                                                           "output.keep_last=3"))
    assert cli_main(["train", str(config), "--no-preflight"]) == 0
    root = run_dir / "checkpoints"
    optimizer = root / "step-00000003" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a copy cut short
    adapter = root / "step-00000002" / "adapter_model.safetensors"
    raw = bytearray(adapter.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit-pattern, same size
    adapter.write_bytes(bytes(raw))
    capsys.readouterr()

    assert cli_main(["train", str(config), "--no-preflight", "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step-00000003 fails its checks (optimizer.pt is 100 bytes, its manifest says" in captured.err
    assert "checkpoint step-00000002 fails its checks (adapter_model.safetensors fails its sha256 check" \
        in captured.err
    assert f"resuming from {root / 'step-00000001'}, the newest checkpoint that passes its checks" in captured.err
    assert f"resumed from {root / 'step-00000001'} at step 1" in captured.out
    # the damaged ones are kept aside, out of --resume auto's way and out of keep_last's count
    assert _entries(run_dir) == [".step-00000002.damaged", ".step-00000003.damaged",
                                 "step-00000001", "step-00000002", "step-00000003"]
    assert all(ckpt.verify_checkpoint(root / f"step-0000000{i}") is None for i in (1, 2, 3))
    assert _steps(run_dir) == [1, 2, 3]


def test_no_checkpoint_that_passes_is_a_clear_refusal_before_tokenizing(make_config, tmp_path, capsys):
    config, run_dir = _config_file(make_config, tmp_path, ("train.max_steps=2", "output.save_every_steps=1"))
    assert cli_main(["train", str(config), "--no-preflight"]) == 0
    root = run_dir / "checkpoints"
    (root / "step-00000001" / ckpt.MANIFEST).unlink()
    (root / "step-00000002" / "scheduler.pt").unlink()
    capsys.readouterr()

    assert cli_main(["train", str(config), "--no-preflight", "--resume", "auto", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 checkpoints in {root} passes its checks; nothing to resume from" in err
    assert "step-00000002: scheduler.pt is missing" in err
    assert "step-00000001: no manifest.json (its save did not finish, or it was copied in part)" in err
    assert "--overwrite" in err and "tokenizing" not in err
    assert _entries(run_dir) == ["step-00000001", "step-00000002"]  # nothing moved when nothing is resumed

    assert cli_main(["train", str(config), "--no-preflight", "--resume", str(root / "step-00000002")]) == 2
    assert "the checkpoint fails its checks: scheduler.pt is missing" in capsys.readouterr().err


def test_a_changed_data_file_refuses_resume_unless_asked(make_config, tmp_path, capsys):
    config, run_dir = _config_file(make_config, tmp_path, ("train.max_steps=2",))
    data = Path(yaml.safe_load(config.read_text())["data"]["path"])
    assert cli_main(["train", str(config), "--no-preflight"]) == 0
    write_jsonl(data, alpaca_rows(64) + alpaca_rows(8, seed=5))  # rows added after the checkpoint
    capsys.readouterr()

    resume = ["train", str(config), "--no-preflight", "--resume", "auto", "train.max_steps=4"]
    assert cli_main(resume) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {run_dir / 'checkpoints' / 'step-00000002'}: the training data changed" in err
    assert f"data file {data}: its content hash differs from the one step-00000002 was trained on" in err
    assert "--resume-changed-data" in err
    assert "tokenizing" not in err  # refused before the data (and long before the weights)

    assert cli_main([*resume, "--resume-changed-data"]) == 0
    captured = capsys.readouterr()
    assert f"warning: --resume-changed-data: data file {data}: its content hash differs" in captured.err
    assert "resumed from" in captured.out and "at step 2" in captured.out
    assert _steps(run_dir) == [1, 2, 3, 4]
    state = ckpt.read_state(run_dir / "checkpoints" / "step-00000004")
    assert state["data"]["samples"] == 72 and state["data"]["path"] == str(data)

    assert cli_main(["train", str(config), "--no-preflight", "--resume-changed-data"]) == 2
    assert "--resume-changed-data applies to a resumed run" in capsys.readouterr().err


HOLDER = ("import sys, time; from pathlib import Path; from trainer.loop.runlock import lock_run_dir; "
          "held = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_a_second_run_on_an_output_dir_in_use_is_refused_and_a_killed_runs_lock_is_not(make_config, tmp_path,
                                                                                          capsys):
    config, run_dir = _config_file(make_config, tmp_path, ("train.max_steps=2",))
    assert cli_main(["train", str(config), "--no-preflight"]) == 0
    adapter = run_dir / "checkpoints" / "step-00000002" / "adapter_model.safetensors"
    saved = adapter.read_bytes()
    capsys.readouterr()

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        # even --overwrite, which would delete the live run's checkpoints, is refused
        assert cli_main(["train", str(config), "--no-preflight", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"output.dir {run_dir} is in use by another samebox train (PID {holder.pid}, running since" in err
        assert "tokenizing" not in err
        assert adapter.read_bytes() == saved
    finally:
        holder.kill()  # kill -9: the lock file stays, the kernel drops the lock
        holder.wait()
    assert (run_dir / ".samebox-train.lock").is_file()
    assert cli_main(["train", str(config), "--no-preflight", "--resume", "auto", "train.max_steps=3"]) == 0
    assert _steps(run_dir) == [1, 2, 3]
    assert not (run_dir / ".samebox-train.lock").exists()  # a run that ends lets go of it and removes it
    lock_run_dir(run_dir).release()


def test_what_a_killed_save_leaves_is_tidied_at_the_next_start(make_config, tmp_path, capsys):
    """Killed mid-write: the unfinished copy goes. Killed between a re-save's two renames: the step's earlier
    copy is put back. Killed after both: the displaced copy goes."""
    root = tmp_path / "run" / "checkpoints"
    for name in (".step-00000006.partial", ".step-00000005.old", ".step-00000004.old", "step-00000004"):
        (root / name).mkdir(parents=True)
        (root / name / "file").write_text(name)
    ckpt.tidy_staging(tmp_path / "run")
    assert _entries(tmp_path / "run") == ["step-00000004", "step-00000005"]
    assert (root / "step-00000005" / "file").read_text() == ".step-00000005.old"
    assert (root / "step-00000004" / "file").read_text() == "step-00000004"
