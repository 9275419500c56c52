"""A new user's first runs through `samebox train`: output.dir made before the preflight, the data checked before
the self-test and the weights, an earlier run's checkpoints never silently mixed with a new one, a resumed run's
record without duplicate steps, a max_length that leaves nothing to train, and progress while tokenizing."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from builder.cli import main as cli_main
from builder.core.progress import Progress
from tests.trainer.conftest import alpaca_rows, write_jsonl
from trainer.loop import preflight
from trainer.loop.recipe import LoRAFinetuneRecipe

# A stand-in `samebox selftest --quick --json`: passes only when --data-dir exists (as the real data_dir check
# once did) and records the flags it got.
SELFTEST_STANDIN = """
import json, os, sys
args = sys.argv[1:]
json.dump(args, open(os.environ["STANDIN_LOG"], "w"))
data_dir = args[args.index("--data-dir") + 1]
ok = os.path.isdir(data_dir)
print(json.dumps({"findings": [] if ok else [{"check": "data_dir", "severity": "fail", "message": "missing",
                                               "remediation": "mkdir"}], "timings": {"load": 2.0, "torch": 1.5}}))
sys.exit(0 if ok else 1)
"""


def _config_file(make_config, tmp_path: Path, overrides: tuple[str, ...] = (), name: str = "run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(make_config(overrides=overrides, name=name).to_dict()))
    return path


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_output_dir_is_made_before_the_preflight(make_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "SELFTEST", [sys.executable, "-c", SELFTEST_STANDIN, "selftest", "--quick"])
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "selftest-args.json"))
    run_dir = tmp_path / "deep" / "runs" / "first"
    config = _config_file(make_config, tmp_path, ("train.max_steps=1", f"output.dir={run_dir}"))
    assert cli_main(["train", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "samebox: preflight: samebox selftest --quick --data-dir" in out
    assert "preflight passed in" in out and "(load 2.0 s, torch 1.5 s)" in out
    args = json.loads((tmp_path / "selftest-args.json").read_text())
    # the tiny model is local (its config.json is here); fp32 LoRA (dropout 0) with attention auto: flash-attn, SDPA
    # and the fused layers' kernels, no bitsandbytes
    assert args[args.index("--kernels") + 1] == "flash-attn,sdpa,fused"
    assert (run_dir / "checkpoints" / "step-00000001").is_dir()


def test_preflight_kernels_follow_the_config(make_config):
    assert preflight.kernels_for(make_config()) == ["flash-attn", "sdpa", "fused"]
    assert preflight.kernels_for(make_config(overrides=("model.attention=sdpa", "model.quantization=nf4",
                                                        "model.dtype=bf16"))) == ["sdpa", "bitsandbytes", "fused"]
    assert preflight.kernels_for(make_config(overrides=("model.attention=eager", "train.fused=false"))) == []
    # the fused layers are not the run's path with LoRA dropout or unpacked batches: their kernels are not tested
    for off in ("lora.dropout=0.1", "data.packing=false"):
        assert "fused" not in preflight.kernels_for(make_config(overrides=(off,)))


def test_starting_over_on_an_earlier_runs_checkpoints_is_refused(make_config, tmp_path, capsys):
    config = _config_file(make_config, tmp_path, ("train.max_steps=2",))
    run_dir = tmp_path / "run"
    assert cli_main(["train", str(config), "--no-preflight"]) == 0
    first = (run_dir / "checkpoints" / "step-00000002" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()

    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (newest: step-00000002)" in err
    assert "--resume auto" in err and "another output.dir" in err and "--overwrite" in err
    assert (run_dir / "checkpoints" / "step-00000002" / "adapter_model.safetensors").read_bytes() == first
    assert cli_main(["train", str(config), "--no-preflight", "--overwrite", "--resume", "auto"]) == 2
    assert "pass one of them" in capsys.readouterr().err

    (run_dir / "checkpoints" / "step-00000002").rename(run_dir / "checkpoints" / "step-00000009")  # a longer run
    assert cli_main(["train", str(config), "--no-preflight", "--overwrite"]) == 0
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]
    assert _steps(run_dir) == [1, 2]  # the earlier run's rows are gone, not mixed in


def test_resume_after_a_kill_continues_the_record_without_duplicate_steps(make_config, tmp_path):
    """The state a kill -9 leaves: rows of steps 4-5 written, their checkpoint not, the last line torn."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ("train.max_steps=5", "output.save_every_steps=3", "output.tensorboard=true")
    recipe = LoRAFinetuneRecipe(make_config(overrides=overrides))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    run_dir = Path(recipe.cfg.output.dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000005")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 1.2')
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6

    resumed = LoRAFinetuneRecipe(make_config(overrides=("train.max_steps=7", *overrides[1:])), resume="auto")
    resumed.setup()
    assert resumed.step == 3
    resumed.train()
    resumed.cleanup()
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6, 7]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("rows", "overrides", "expected"), [
    (["{\"instruction\": \"x\""], (), ":1: not valid JSON"),
    ([], ("data.path=/nonexistent/train.jsonl",), "data file not found"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], (), "expected key messages"),
    (alpaca_rows(8), ("data.max_length=4",), "data.max_length=4 leaves no token to train in any of the 8 samples"),
])
def test_data_problems_stop_before_the_selftest_and_the_weights(make_config, tmp_path, monkeypatch, capsys,
                                                                 rows, overrides, expected):
    """No GPU self-test and no weights for a run whose data cannot train (its tokenizer alone is loaded)."""
    import transformers

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before the data was checked")

    monkeypatch.setattr(preflight, "start_preflight", must_not_run)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_run)
    config = tmp_path / "c.yaml"
    cfg = make_config(overrides=overrides).to_dict()
    if rows:
        write_jsonl(Path(cfg["data"]["path"]), rows)
    config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(config)]) == 2
    assert expected in capsys.readouterr().err


def test_non_utf8_data_names_the_line(make_config, tmp_path, capsys):
    cfg = make_config(overrides=("train.max_steps=1",))
    path = Path(cfg.data.path)
    path.write_bytes(path.read_bytes() + "{\"instruction\": \"翻译\", \"output\": \"x\"}\n".encode("gbk"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:65: not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("field", ["output.dir", "data.cache_dir"])
def test_an_unwritable_output_or_cache_dir_exits_2_before_tokenizing(make_config, tmp_path, capsys, field):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = _config_file(make_config, tmp_path, (f"{field}={blocker / 'sub'}",))
    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert f"{field}={blocker / 'sub'} is not a writable directory" in err and "Traceback" not in err
    assert "tokenizing" not in err


def test_tokenizing_says_how_far_it_is(make_config, capsys):
    from trainer.loop.prepare import prepare_data

    data, note = prepare_data(make_config())
    err = capsys.readouterr().err
    assert "samebox: tokenizing run.jsonl: 64 rows ..." in err  # not a terminal: one line per stage
    assert "samebox: tokenizing run.jsonl: done, 64/64 rows in" in err
    assert note.startswith("64 samples (tokenized, 0 truncated")
    stream = io.StringIO()
    with Progress("tokenizing big.jsonl", 1000, "rows", stream=stream, every_s=0.0, tty=True) as progress:
        progress.update(250)
    drawn = stream.getvalue()
    assert "\r\033[Ksamebox: tokenizing big.jsonl: 250/1,000 rows (25%), ETA " in drawn
    assert drawn.endswith("done, 250/1,000 rows in 0m00s\n")


# A stand-in self-test that passes only once the trainer has imported the weights' libraries: it waits (up to 60 s)
# for the file the patched import_libraries writes. A command that waited for the self-test before importing would
# make it fail.
SELFTEST_BESIDE = """
import json, os, sys, time
marker = os.environ["IMPORTED_MARKER"]
deadline = time.time() + 60
while not os.path.exists(marker) and time.time() < deadline:
    time.sleep(0.05)
ok = os.path.exists(marker)
print(json.dumps({"findings": [] if ok else [{"check": "order", "severity": "fail", "message": "imports waited",
                                               "remediation": "-"}], "timings": {}}))
sys.exit(0 if ok else 1)
"""


def test_the_preflight_runs_beside_the_imports_and_the_start_is_timed(make_config, tiny_model_dir, tmp_path,
                                                                      monkeypatch, capsys):
    from trainer.model import load

    marker = tmp_path / "imported"
    real = load.import_libraries

    def import_libraries(cfg):
        real(cfg)
        marker.write_text("done")

    monkeypatch.setattr(load, "import_libraries", import_libraries)
    monkeypatch.setattr(preflight, "SELFTEST", [sys.executable, "-c", SELFTEST_BESIDE, "selftest", "--quick"])
    monkeypatch.setenv("IMPORTED_MARKER", str(marker))
    run_dir = tmp_path / "runs" / "beside"
    config = _config_file(make_config, tmp_path, ("train.max_steps=2", f"output.dir={run_dir}"))
    assert cli_main(["train", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "preflight passed in" in out
    startup = json.loads((run_dir / "summary.json").read_text())["startup"]
    marks = startup["seconds_to"]
    order = ["command", "data", "imports", "preflight", "weights", "ready", "step_1"]
    assert set(marks) == set(order) and [marks[k] for k in order] == sorted(marks.values())
    assert sum(startup["stage_seconds"].values()) == pytest.approx(marks["step_1"], abs=0.05)
    assert f"step 1 at {marks['step_1']:.1f} s after the command (" in out
    # the trainer timed its one save (after the last step), the checkpoint a restart would resume from
    assert startup["first_save_s"] > 0 and len(list((run_dir / "checkpoints").glob("step-*/manifest.json"))) == 1
    # the tiny model's weight files and torch's libraries were read beside the imports, whole
    warmed = startup["prefetch"]
    weights = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    assert warmed["library_bytes"] > weights > 0
    assert warmed["bytes"] == warmed["library_bytes"] + weights and warmed["read_bytes"] == warmed["bytes"]
