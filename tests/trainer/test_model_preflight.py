"""Model source resolution, precision/attention choices on CPU, and the preflight self-test gate."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import yaml

from builder.cli import main as cli_main
from builder.core.errors import SameboxError
from trainer.config import ModelConfig
from trainer.loop.preflight import PreflightFailed, model_config_for_selftest, run_preflight, selftest_command
from trainer.model.hub import resolve_source
from trainer.model.load import fetch_model, pick_attention, quantization_config


def test_model_sources(tiny_model_dir, tmp_path):
    assert resolve_source(ModelConfig(name=str(tiny_model_dir))) == ("local", str(tiny_model_dir))
    assert resolve_source(ModelConfig(name="Qwen/Qwen2.5-7B")) == ("hub", "Qwen/Qwen2.5-7B")
    assert resolve_source(ModelConfig(name="modelscope://Qwen/Qwen2.5-7B")) == ("modelscope", "Qwen/Qwen2.5-7B")
    with pytest.raises(SameboxError, match="no config.json"):
        resolve_source(ModelConfig(name=str(tmp_path)))
    with pytest.raises(SameboxError, match="neither a directory nor a hub id"):
        resolve_source(ModelConfig(name="not a model"))
    if importlib.util.find_spec("modelscope") is None:
        with pytest.raises(SameboxError, match="modelscope package is not installed"):
            fetch_model(ModelConfig(name="modelscope://Qwen/Qwen2.5-7B"))


def test_cpu_refuses_qlora_and_flash_attention():
    cpu = torch.device("cpu")
    with pytest.raises(SameboxError, match="needs a CUDA GPU"):
        quantization_config(ModelConfig(name="m", quantization="nf4"), cpu, torch.bfloat16)
    with pytest.raises(SameboxError, match="flash-attn"):
        pick_attention(ModelConfig(name="m", attention="flash_attention_2"), cpu)
    assert pick_attention(ModelConfig(name="m"), cpu) == "sdpa"


def test_preflight_passes_fails_or_explains_a_missing_selftest():
    run_preflight(command=[sys.executable, "-c", "print('{}')"])
    report = {"failed": True, "findings": [
        {"check": "ecc", "severity": "fail", "message": "GPU 0: 3 uncorrectable ECC errors", "remediation": "move"},
        {"check": "mig", "severity": "pass", "message": "off", "remediation": ""}]}
    failing = [sys.executable, "-c", f"import json,sys; print(json.dumps({report!r})); sys.exit(1)"]
    with pytest.raises(PreflightFailed) as e:
        run_preflight(command=failing)
    assert e.value.problems == ["ecc: GPU 0: 3 uncorrectable ECC errors -> move"]
    missing = [sys.executable, "-c", "import sys; sys.stderr.write(\"invalid choice: 'selftest'\"); sys.exit(2)"]
    with pytest.raises(SameboxError, match="--no-preflight"):
        run_preflight(command=missing)


def test_preflight_checks_flash_attn_for_the_model_when_its_config_is_here(tiny_model_dir, tmp_path, monkeypatch):
    local = model_config_for_selftest(ModelConfig(name=str(tiny_model_dir)))
    assert local == str(tiny_model_dir / "config.json")
    assert selftest_command("/data", local)[-4:] == ["--data-dir", "/data", "--model", local]
    assert model_config_for_selftest(ModelConfig(name=str(tiny_model_dir), attention="sdpa")) is None
    # a hub id: the config in the Hugging Face cache once downloaded; not yet downloaded -> the default head dims
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert model_config_for_selftest(ModelConfig(name="org/phi")) is None
    repo = tmp_path / "models--org--phi"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text('{"hidden_size": 2560, "num_attention_heads": 32}')
    assert model_config_for_selftest(ModelConfig(name="org/phi")) == str(repo / "snapshots" / "abc123" / "config.json")
    assert model_config_for_selftest(ModelConfig(name="not a model")) is None
    assert "--model" not in selftest_command("/data")
    # a config without head_dim or hidden_size/num_attention_heads (GPT-2 style): the self-test's default head dims
    (repo / "snapshots" / "abc123" / "config.json").write_text('{"n_embd": 768, "n_head": 12}')
    assert model_config_for_selftest(ModelConfig(name="org/phi")) is None


def test_train_command_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nme: x\n")
    assert cli_main(["train", str(bad), "--no-preflight"]) == 2
    assert "unknown key model.nme" in capsys.readouterr().err


def test_train_command_runs_the_real_selftest_first(make_config, tmp_path, capsys):
    """Without --no-preflight the real `samebox selftest --quick` runs (after the data is checked); on a machine
    without a GPU it fails, and says --no-preflight is the way to train there."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_config().to_dict()))
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may pass the self-test")
    assert cli_main(["train", str(cfg)]) == 1, "a failing check exits 1 (2 is for user mistakes)"
    err = capsys.readouterr().err
    assert "preflight self-test failed" in err and "--no-preflight" in err


def test_a_chatty_self_test_runs_on_while_nobody_waits_for_it(tmp_path) -> None:
    """The command imports for seconds before it waits for the preflight: a self-test that writes more than a pipe
    holds must not stall meanwhile."""
    import time

    from trainer.loop.preflight import start_preflight

    marker = tmp_path / "finished"
    chatty = [sys.executable, "-c", "import sys; sys.stderr.write('x' * (1 << 20)); sys.stderr.flush(); "
              f"open({str(marker)!r}, 'w').close(); print('{{}}')"]
    with start_preflight(command=chatty) as pending:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the self-test stalled on a full pipe"
        pending.wait()
