"""What a new user hit on a first run, each kept fixed: `make demo` end to end; checks that fail fast (resume, the
export's output path) before any weights load; no empty directories left by a run that failed its checks; every
config problem at once; data errors that name the absolute path and the real position; no bitsandbytes on a run
that does not quantize; `samebox serve` of a missing path; files written 0644; `samebox train --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.cli import main as cli_main
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo"


class FailingPreflight:
    """What start_preflight returns when the self-test finds a failure: wait() raises it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def wait(self):
        from trainer.loop.preflight import PreflightFailed

        raise PreflightFailed(["gpu: no GPU"])


# --- make demo ----------------------------------------------------------------------------------------------------


def test_make_demo_runs_the_demo_script():
    proc = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert any("configs/demo/demo.py" in line for line in proc.stdout.splitlines()), proc.stdout


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


# --- resume checks before the weights -------------------------------------------------------------------------------


def _no_weights(monkeypatch) -> None:
    """Loading weights (or running the GPU self-test) fails the test: the checks must come first."""
    import transformers

    from trainer.loop import preflight

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before the checks")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_run)
    monkeypatch.setattr(preflight, "start_preflight", must_not_run)


def _config_file(make_config, tmp_path: Path, overrides: tuple[str, ...] = ()) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(make_config(overrides=overrides).to_dict()))
    return path


def _fake_checkpoint(run_dir: Path, step: int, data: dict) -> Path:
    """What the resume checks read of a checkpoint: its trainer_state.json (no weights are needed for them)."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "data": data}))
    from trainer.loop import checkpoint

    checkpoint._write_manifest(path)  # a complete checkpoint as far as its manifest goes
    return path


@pytest.mark.parametrize("how", ["changed seed", "not a checkpoint", "unreadable state"])
def test_resume_problems_stop_before_the_selftest_and_the_weights(make_config, tmp_path, monkeypatch, capsys, how):
    _no_weights(monkeypatch)
    config = _config_file(make_config, tmp_path, ("train.seed=7",))
    run_dir = tmp_path / "run"
    order = {"samples": 64, "samples_per_step": 8, "seed": 42, "shuffle": True}
    checkpoint = _fake_checkpoint(run_dir, 3, order)
    resume = "auto"
    if how == "not a checkpoint":
        resume = str(tmp_path / "elsewhere")
    elif how == "unreadable state":
        (checkpoint / "trainer_state.json").write_text('{"step": 3')
    assert cli_main(["train", str(config), "--resume", resume]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = {"changed seed": "seed: checkpoint 42, now 7",
                "not a checkpoint": "elsewhere",
                "unreadable state": "trainer_state.json"}[how]
    assert expected in err, err


def test_the_recipe_checks_the_resume_point_before_the_weights(make_config, tmp_path, monkeypatch):
    from builder.core.errors import SameboxError
    from trainer.loop.recipe import LoRAFinetuneRecipe

    _no_weights(monkeypatch)
    cfg = make_config(overrides=("train.seed=7",))
    _fake_checkpoint(Path(cfg.output.dir), 3, {"samples": 64, "samples_per_step": 8, "seed": 42, "shuffle": True})
    with pytest.raises(SameboxError, match="data order would differ"):
        LoRAFinetuneRecipe(cfg, resume="auto").setup()


# --- nothing left on disk by a run that fails its checks -----------------------------------------------------------


@pytest.mark.parametrize("problem", ["no data file", "malformed row", "preflight fails"])
def test_a_run_that_fails_its_checks_leaves_no_directories(make_config, tmp_path, monkeypatch, capsys, problem):
    """As the shipped configs' AutoDL paths on another host: output.dir, the cache and their parents are new."""
    from trainer.loop import preflight

    fresh = tmp_path / "fresh"
    overrides = (f"output.dir={fresh / 'autodl-tmp' / 'runs' / 'first'}", f"data.cache_dir={fresh / 'cache' / 'tok'}")
    if problem == "no data file":
        overrides += ("data.path=nowhere/train.jsonl",)
    config = _config_file(make_config, tmp_path, overrides)
    if problem == "malformed row":
        (tmp_path / "run.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"\n')
    elif problem == "preflight fails":
        monkeypatch.setattr(preflight, "start_preflight", lambda cfg: FailingPreflight())
    code = cli_main(["train", str(config)])
    assert code == (1 if problem == "preflight fails" else 2), capsys.readouterr().err
    assert not (fresh / "autodl-tmp").exists()
    # the tokenized cache, once written, is kept for the next run; a run that failed before writing it leaves none
    assert (fresh / "cache").exists() == (problem == "preflight fails")


def test_a_run_that_fails_leaves_an_existing_output_dir_alone(make_config, tmp_path, capsys):
    kept = tmp_path / "mine"
    kept.mkdir()
    config = _config_file(make_config, tmp_path, (f"output.dir={kept / 'run'}", "data.path=nowhere.jsonl"))
    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    assert kept.is_dir() and not (kept / "run").exists()


# --- every config problem at once ----------------------------------------------------------------------------------


def test_a_config_with_several_problems_reports_them_all(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: ''\n  quantization: nf4\n  dtype: fp32\ntrain:\n  lr: -1\n  epocs: 2\n")
    assert cli_main(["train", str(config), "data.path=x.jsonl", "bogus=1"]) == 2
    err = capsys.readouterr().err
    for problem in ("override 'bogus=1' is not section.key=value", "train.lr=-1: expected a number > 0",
                    "unknown key train.epocs", "model.name='': expected a local directory",
                    "model.quantization=nf4 computes in bf16 or fp16"):
        assert problem in err, problem


def test_a_conflict_is_not_reported_for_a_value_already_found_bad(tmp_path):
    from builder.core.errors import SameboxError
    from trainer.config import load_config

    with pytest.raises(SameboxError) as e:
        load_config(None, ["model.name=x", "data.path=x", "model.quantization=nf4", "model.dtype=fp33"])
    assert e.value.problems == ["model.dtype='fp33': expected one of bf16, fp16, fp32 (default bf16)"]


# --- data errors: the absolute path, the real position ---------------------------------------------------------------


def test_a_relative_data_path_says_where_it_was_looked_for(make_config, tmp_path, monkeypatch, capsys):
    config = _config_file(make_config, tmp_path, ("data.path=data/train.jsonl",))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", str(config), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert f"data file not found: data/train.jsonl (looked for {tmp_path / 'data' / 'train.jsonl'})" in err
    assert f"taken from the directory samebox runs in ({tmp_path})" in err


@pytest.mark.parametrize(("line", "expected"), [
    ('{"instruction": "x", "output": "y"', "the line ends after 34 characters, before its JSON does"),
    ('{"instruction": "x", "output": "the answ', "the line ends inside the string that starts at character 32 of 40"),
    ('{"instruction": "x", "output": "y"}}', 'Extra data at character 36 of 36, near "'),
    ('{"instruction": "x" "output": "y"}', "Expecting ',' delimiter at character 21 of 34"),
])
def test_a_broken_json_row_names_its_line_and_what_is_wrong(tmp_path, line, expected):
    from builder.core.errors import SameboxError
    from trainer.data.dataset import read_rows

    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n")
    with pytest.raises(SameboxError) as e:
        read_rows(path, "auto")
    (problem,) = e.value.problems
    assert problem.startswith(f"{path}:2: not valid JSON: ") and expected in problem, problem
    assert "column 1" not in problem


# --- export: the output path before the weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_run(tmp_path_factory) -> Path:
    """A finished run as `samebox train` leaves it: config.yaml naming a tiny base, adapter/."""
    from tests.serve.conftest import save_adapter, save_tiny_model, write_run_dir

    base = save_tiny_model(tmp_path_factory.mktemp("base") / "tiny-qwen2")
    run = write_run_dir(tmp_path_factory.mktemp("runs") / "tiny-sft", base)
    save_adapter(base, run / "adapter")
    return run


@pytest.mark.parametrize("flag", ["--merge", "--gguf"])
@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_export_to_an_unwritable_place_exits_2_before_loading(served_run, tmp_path, monkeypatch, capsys, flag,
                                                              where):
    _no_weights(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # /sys takes no new entry, even from root (tests run as root, to whom a chmod 0555 directory is writable)
    parent = blocker / "sub" if where == "under a file" else Path("/sys")
    out = parent / ("merged.gguf" if flag == "--gguf" else "merged")
    assert cli_main(["export", str(served_run), flag, str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{flag} {out}:" in err
    assert (f"{blocker} is a file, not a directory" if where == "under a file" else "cannot write in /sys") in err
    assert "a directory you can write" in err
    assert not (blocker.parent / "sub").exists()


# --- samebox train --json -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_json_prints_one_object_on_stdout_and_the_rest_on_stderr(make_config, tmp_path, capsys):
    config = _config_file(make_config, tmp_path, ("train.max_steps=2",))
    assert cli_main(["train", str(config), "--no-preflight", "--json"]) == 0
    captured = capsys.readouterr()
    outcome = json.loads(captured.out)  # the whole of stdout is one JSON object
    assert outcome["status"] == "finished" and outcome["steps"] == outcome["total_steps"] == 2
    assert Path(outcome["adapter"], "adapter_model.safetensors").is_file()
    assert outcome["run_dir"] == str(tmp_path / "run") and "train_seconds" in outcome
    assert "step 2/2" in captured.err and "done: adapter in" in captured.err
    # the adapter and the checkpoint's safetensors are written 0644, like every other file of the run
    written = [p for d in (Path(outcome["adapter"]), tmp_path / "run" / "checkpoints" / "step-00000002")
               for p in d.iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o777 != 0o644} == {}

    assert cli_main(["train", str(config), "--no-preflight", "--json", "--resume", "auto"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["status"] == "already finished" and again["steps"] == 2


def test_train_json_says_a_failed_preflight(make_config, tmp_path, monkeypatch, capsys):
    from trainer.loop import preflight

    monkeypatch.setattr(preflight, "start_preflight", lambda cfg: FailingPreflight())
    assert cli_main(["train", str(_config_file(make_config, tmp_path)), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"status": "preflight failed", "problems": ["gpu: no GPU"]}
    assert "tokenizing run.jsonl" in captured.err and "preflight self-test failed" in captured.err


# --- no bitsandbytes on a run that does not quantize -------------------------------------------------------------


BNB_PROBE = """
import sys
from builder.cli import main
code = main(sys.argv[1:])
print("bitsandbytes loaded:", sys.modules.get("bitsandbytes") is not None)
sys.exit(code)
"""


@pytest.mark.slow
def test_an_unquantized_run_never_imports_bitsandbytes(make_config, tmp_path):
    """bitsandbytes is installed here (the NF4 tests run its CPU kernels), and peft imports it when it can."""
    config = _config_file(make_config, tmp_path, ("train.max_steps=1",))
    proc = subprocess.run([sys.executable, "-c", BNB_PROBE, "train", str(config), "--no-preflight"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitsandbytes loaded: False" in proc.stdout
    assert "bitsandbytes" not in proc.stderr and "kernels-community" not in proc.stderr


def test_a_process_that_quantizes_keeps_bitsandbytes():
    from trainer.model.load import hide_bitsandbytes

    hide_bitsandbytes("nf4")
    assert sys.modules.get("bitsandbytes", "absent") is not None


# --- samebox serve of a path that is not there ---------------------------------------------------------------------


def test_serve_of_a_missing_run_dir_says_so_and_names_the_runs_beside_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "first").mkdir(parents=True)
    (tmp_path / "runs" / "first" / "config.yaml").write_text("model: {name: x}\n")
    monkeypatch.chdir(tmp_path)
    for target in ("runs/nope", "nope", "./runs/a/b"):
        assert cli_main(["serve", target]) == 2
        err = capsys.readouterr().err
        assert f"{target}: no such run directory or model directory ({tmp_path / target.removeprefix('./')} " \
               "does not exist)" in err
        assert "model.name" not in err and "output.dir of a `samebox train` run" in err
    assert cli_main(["serve", "runs/nope"]) == 2
    assert "runs beside it: runs/first" in capsys.readouterr().err


def test_serve_of_a_hub_id_that_cannot_be_fetched_speaks_of_the_target(tmp_path, monkeypatch):
    from builder.core.errors import SameboxError
    from trainer.serve.served import resolve_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(SameboxError) as e:
        resolve_model("someorg/nope")
    err = str(e.value)
    assert f"someorg/nope: no such run directory or model directory ({tmp_path / 'someorg' / 'nope'} does not " \
           "exist), and as a hub id it cannot be fetched: HF_HUB_OFFLINE is set" in err
    assert "model.name" not in err
