"""What `samebox serve` decides before any weights load: bad input exits 2 with what would work, the engine is
chosen from what this environment has (and says what it passed over), vLLM's command line keeps the key out of
argv."""

from __future__ import annotations

import shutil
import socket

import pytest

from builder.cli import main
from tests.serve.conftest import save_adapter, save_tiny_model, write_run_dir
from trainer.serve.gate import Limits
from trainer.serve.served import ServedModel, resolve_model
from trainer.serve.server import Facts, ServeOptions, choose_engine, gate_limits, vllm_argv


def serve_exit(capsys, *argv: str) -> tuple[int, str]:
    code = main(["serve", *argv])
    return code, capsys.readouterr().err


def test_missing_run_dir_exits_2_before_torch(capsys, tmp_path):
    code, err = serve_exit(capsys, str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


def test_directory_that_is_neither_run_nor_model(capsys, tmp_path):
    code, err = serve_exit(capsys, str(tmp_path))
    assert code == 2 and "neither a `samebox train` run directory" in err and "output.dir" in err


def test_run_without_adapter_points_at_its_newest_checkpoint(capsys, tmp_path, base_dir):
    run = write_run_dir(tmp_path / "unfinished", base_dir)
    save_adapter(base_dir, run / "checkpoints" / "step-2")
    code, err = serve_exit(capsys, str(run))
    assert code == 2 and "has no adapter" in err and f"--adapter {run / 'checkpoints' / 'step-2'}" in err
    assert resolve_model(str(run), str(run / "checkpoints" / "step-2")).adapter_dir == run / "checkpoints" / "step-2"


def test_run_never_started_says_how_to_finish(capsys, tmp_path, base_dir):
    code, err = serve_exit(capsys, str(write_run_dir(tmp_path / "fresh", base_dir)))
    assert code == 2 and "--resume auto" in err


def test_adapter_dir_that_is_not_an_adapter(capsys, tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    code, err = serve_exit(capsys, str(base_dir), "--adapter", str(tmp_path / "empty"))
    assert code == 2 and "is not a LoRA adapter" in err


def test_adapter_of_another_base_exits_2_naming_modules_and_the_right_base(capsys, tmp_path, run_dir):
    wider = save_tiny_model(tmp_path / "wider", hidden=48)
    code, err = serve_exit(capsys, str(wider), "--adapter", str(run_dir / "adapter"))
    assert code == 2 and "does not fit the base model" in err
    assert "layers.0.mlp.gate_proj: the adapter takes 32 inputs, the base 48" in err
    assert "serve the base it was trained on" in err


def test_base_moved_since_training_exits_2(capsys, tmp_path, base_dir):
    moved = tmp_path / "moved-base"
    shutil.copytree(base_dir, moved)
    run = write_run_dir(tmp_path / "run", moved)
    save_adapter(moved, run / "adapter")
    shutil.rmtree(moved)
    code, err = serve_exit(capsys, str(run))
    assert code == 2 and "moved-base" in err


def test_port_in_use_exits_2_before_loading(capsys, run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve_exit(capsys, str(run_dir), "--host", "127.0.0.1", "--port", str(port))
    assert code == 2 and f"port {port} is in use" in err and "--port" in err


def test_port_out_of_range_is_a_usage_error(capsys, run_dir):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(run_dir), "--port", "70000"])
    assert e.value.code == 2 and "not a port" in capsys.readouterr().err


def test_requested_engine_that_cannot_run_exits_2_naming_the_fix(capsys, run_dir):
    code, err = serve_exit(capsys, str(run_dir), "--engine", "vllm", "--host", "127.0.0.1")
    assert code == 2 and "engine vllm cannot run here" in err and "--engine transformers" in err


FACTS = Facts(torch="2.11.0", cuda=True, transformers="5.17.0")


@pytest.mark.parametrize(("facts", "engine", "note"), [
    (FACTS, "transformers", "vllm: not installed (vllm==0.26.0 pins torch 2.11: pip install vllm==0.26.0)"),
    (Facts("2.8.0", True, "5.23.0", vllm="0.11.0", vllm_torch="2.8.0"), "vllm", None),
    (Facts("2.11.0", True, "5.23.0", vllm="0.11.0", vllm_torch="2.8.0"), "transformers",
     "vllm: vllm 0.11.0 pins torch 2.8.0, this environment has torch 2.11.0"),
    (Facts("2.11.0", False, "5.23.0", vllm="0.26.0", vllm_torch="2.11.0"), "transformers", "vllm: needs a CUDA GPU"),
    (Facts("2.5.1", True, "5.18.0"), "transformers",
     "vllm: no vLLM release pins torch 2.5.1 (vLLM pins its own torch; this one is the platform's)"),
])
def test_auto_takes_the_best_engine_that_runs_and_says_what_it_passed_over(facts, engine, note):
    chosen, notes = choose_engine("auto", facts)
    assert chosen.name == engine
    assert notes == ([note] if note else [])


def test_no_engine_at_all_names_every_reason():
    from builder.core.errors import SameboxError

    old = Facts("2.3.0", True, "4.57.6", serve_extra_missing=("fastapi",))
    with pytest.raises(SameboxError) as e:
        choose_engine("auto", old)
    text = str(e.value)
    assert "no serving engine" in text and "transformers 4.57.6 is older than 5.17" in text and "vllm:" in text


def test_vllm_command_serves_the_adapter_under_the_name_and_keeps_the_key_out_of_argv(run_dir, base_dir):
    served = ServedModel("tiny-sft", base_dir, run_dir / "adapter", run_dir)
    argv = vllm_argv(served, ServeOptions(host="0.0.0.0", port=6006, api_key="sk-secret"))
    assert argv[:3] == ["vllm", "serve", str(base_dir)]
    assert argv[argv.index("--lora-modules") + 1] == f"tiny-sft={run_dir / 'adapter'}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # r=4 rounded up to a rank vLLM takes
    assert argv[argv.index("--served-model-name") + 1] == "tiny-sft-base"
    assert "--enable-lora" in argv and "sk-secret" not in " ".join(argv)


def test_load_limits_follow_the_batching_unless_given():
    gpu, cpu = Facts("2.11.0", True, "5.25.0"), Facts("2.11.0", False, "5.25.0")
    assert gate_limits(ServeOptions(), gpu) == Limits(max_concurrent=32, max_queue=64)
    assert gate_limits(ServeOptions(), cpu) == Limits(max_concurrent=4, max_queue=8)
    assert gate_limits(ServeOptions(batching="continuous"), cpu).max_concurrent == 32
    given = gate_limits(ServeOptions(max_concurrent=3, max_queue=0, queue_timeout_s=2, read_timeout_s=5), gpu)
    assert given == Limits(max_concurrent=3, max_queue=0, queue_timeout_s=2, read_timeout_s=5)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-concurrent", "0", "at least 1"),
    ("--max-queue", "-1", "at least 0"),
    ("--queue-timeout", "0", "not a number of seconds"),
    ("--read-timeout", "soon", "not a number of seconds"),
])
def test_load_options_out_of_range_are_usage_errors(capsys, run_dir, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(run_dir), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
