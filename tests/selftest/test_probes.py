"""Probes that need no GPU, run for real: the model's attention needs, the lockfile, the data dir."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from builder.core.attention_needs import attention_needs, attention_needs_from_config
from builder.core.errors import SameboxError
from builder.selftest import env_probes


def test_model_needs() -> None:
    qwen = attention_needs_from_config(
        {
            "hidden_size": 3584,
            "num_attention_heads": 28,
            "sliding_window": 131072,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
        },
        "qwen",
    )
    assert (qwen.head_dims, qwen.window, qwen.features) == ((128,), None, ())
    mistral = attention_needs_from_config(
        {"head_dim": 128, "sliding_window": 4096, "hidden_size": 4096, "num_attention_heads": 32}, "mistral"
    )
    assert (mistral.window, mistral.features) == (4096, ("local",))
    gemma = attention_needs_from_config(
        {"text_config": {"head_dim": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0}, "dtype": "float32"},
        "g",
    )
    assert (gemma.head_dims, gemma.features, gemma.dtype) == ((256,), ("local", "softcap"), "bfloat16")
    phi2 = attention_needs_from_config({"hidden_size": 2560, "num_attention_heads": 32}, "phi-2")
    assert (phi2.head_dims, phi2.features) == ((80,), ("uneven_k",))
    with pytest.raises(SameboxError, match="neither head_dim"):
        attention_needs_from_config({"vocab_size": 10}, "bad")


def test_model_needs_from_a_directory(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"head_dim": 64, "num_attention_heads": 8}))
    assert attention_needs(str(tmp_path)).head_dims == (64,)
    assert attention_needs(None).head_dims == (64, 128)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SameboxError, match="not valid JSON"):
        attention_needs(str(tmp_path))


def test_lockfile_drift_is_listed(tmp_path) -> None:
    peft = metadata.version("peft")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"peft=={peft} \\\n    --hash=sha256:{'0' * 64}\npyyaml==0.0.1\nno-such-package==1.0\n")
    reading = env_probes.lockfile_reading(str(lock), "2.11.0+cu130")
    assert reading["chosen_by"] == "given"
    problems = " | ".join(reading["problems"])
    assert "pyyaml" in problems and "0.0.1" in problems and "no-such-package" in problems
    assert "peft" not in problems


def test_which_lockfile(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SAMEBOX_LOCKFILE", raising=False)
    monkeypatch.delenv("SAMEBOX_IMAGE", raising=False)
    monkeypatch.setattr("builder.core.catalog.IMAGE_LOCKFILE", tmp_path / "absent.txt")
    path, how, claimed = env_probes.find_lockfile(None, "2.11.0+cu130")
    if sys.version_info[:2] == (3, 12):
        assert path is not None and path.name == "torch2.11-cu130-py312.txt" and "not set up by samebox" in how
    else:
        assert path is None and "Python" in how
    assert not claimed
    monkeypatch.setenv("SAMEBOX_IMAGE", "torch2.3-cu121-py312")
    path, how, claimed = env_probes.find_lockfile(None, "2.11.0+cu130")
    assert path is not None and path.name == "torch2.3-cu121-py312.txt" and claimed
    monkeypatch.setattr("builder.core.catalog.IMAGE_LOCKFILE", tmp_path / "lock.txt")
    (tmp_path / "lock.txt").write_text("")
    assert env_probes.find_lockfile(None, None) == (tmp_path / "lock.txt", "the samebox image's lock", True)
    assert env_probes.find_lockfile("x.txt", None) == (Path("x.txt"), "given", True)


def test_data_dir_write(tmp_path) -> None:
    reading = env_probes.data_dir(str(tmp_path), write_mib=2)
    assert reading["exists"] and reading["write_mbps"] > 0 and "write_error" not in reading
    assert list(tmp_path.iterdir()) == []



def test_data_dir_not_made_yet_is_judged_on_its_nearest_existing_parent(tmp_path) -> None:
    """`samebox train` makes output.dir after the self-test's checks are planned: a missing one is no failure;
    the disk it will be on is."""
    from builder.selftest import report_from_readings

    run = tmp_path / "runs" / "new"
    reading = env_probes.data_dir(str(run), write_mib=1)
    assert (reading["path"], reading["exists"], reading["judged"]) == (str(run), False, str(tmp_path))
    assert reading["free_bytes"] > 0 and reading["write_mbps"] > 0 and not run.exists()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    readings = {"mode": "quick", "data_dir": {**reading, "free_bytes": 100 * 2**30, "write_mbps": 900.0}}
    (finding,) = [f for f in report_from_readings(readings).findings if f.check == "data_dir"]
    assert finding.severity == "ok" and f"not made yet; judged on {tmp_path}" in finding.message
    (tmp_path / "file").write_text("x")
    under_file = env_probes.data_dir(str(tmp_path / "file" / "run"))
    assert under_file["not_a_directory"] == str(tmp_path / "file")


def test_elf_archs_reads_cuobjdump(monkeypatch, tmp_path) -> None:
    from builder.selftest import kernel_probes
    from builder.wheels import kernelcheck

    monkeypatch.setattr(kernelcheck, "DEFAULT_CUDA_HOME", "/nonexistent")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "cuobjdump"
    tool.write_text(
        "#!/bin/sh\necho 'ELF file    1: flash_attn_2_cuda.1.sm_80.cubin'\n"
        "echo 'ELF file    2: flash_attn_2_cuda.2.sm_90a.cubin'\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert kernel_probes.elf_archs("/x.so") == ["8.0", "9.0"]
    tool.write_text("#!/bin/sh\necho 'cuobjdump fatal: not an ELF file' >&2\nexit 1\n")
    assert kernel_probes.elf_archs("/x.so") is None  # unknown; the varlen cases still run the kernels
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    assert kernel_probes.elf_archs("/x.so") is None
