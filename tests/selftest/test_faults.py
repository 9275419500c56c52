"""Environment and kernel faults (lock, data dir, caches, SDPA, bitsandbytes, flash-attn, LoRA smoke run),
each injected by editing a copy of a healthy machine's recorded readings, is caught by the right check
with the right remediation. GPU faults: test_faults_gpu.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.selftest.conftest import assert_fault_caught, findings, load_readings, severities

GiB = 2**30


def fa(r: dict[str, Any], **reading: Any) -> None:
    """flash-attn readings: the slim sm_90 build's, recorded on the H100 (fixture flash_attn_slim.json), edited."""
    r["flash_attn"] = {k: v for k, v in load_readings("flash_attn_slim").items() if k != "fixture_source"}
    r["flash_attn"].update(reading)


FULL_BUILD = {"local": None, "softcap": None, "alibi": None, "dropout": None}


def lock(r: dict[str, Any], **reading: Any) -> None:
    """A lock the environment claims (set up by samebox), with no drift, then edited. The capture's checkout had
    no lockfiles yet, so its own lock reading says 'missing'."""
    r["lockfile"] = {
        "lockfile": "/work/main/lockfiles/torch2.11-cu130-py312.txt",
        "chosen_by": "set up by samebox: $SAMEBOX_IMAGE",
        "claimed": True,
        "files_checked": False,
        "problems": [],
        "platform": [],
    }
    r["lockfile"].update(reading)


SLIM = {
    "local": "This flash attention build does not support local attention.",
    "softcap": "This flash attention build does not support tanh softcapping.",
    "alibi": "This flash attention build does not support alibi.",
    "dropout": "This flash attention build does not support dropout.",
}


LEAN_GUARD = "This flash attention build does not support headdim not being a multiple of 32."


def lean_build_phi2(r: dict[str, Any]) -> None:
    """A lean build's readings for a Phi-2 config (head dim 80): the varlen case and the probe both hit the guard
    (its text as the lean wheel gave it on the H100, bench/results/flash_attn_build.json)."""
    fa(r, head_dims=[80], cases={"80": {"error": LEAN_GUARD}},
       features={**SLIM, "uneven_k": LEAN_GUARD})
    r["model"] = {"source": "/phi2/config.json", "head_dims": [80], "dtype": "bfloat16", "window": None,
                  "features": ["uneven_k"]}


def needs_window(r: dict[str, Any]) -> None:
    r["model"] = {
        "source": "/m/config.json",
        "head_dims": [128],
        "dtype": "bfloat16",
        "window": 4096,
        "features": ["local"],
    }


# (fault id, edit, check, severity, text expected in the message, text expected in the remediation)
FAULTS = [
    (
        "lock drift",
        lambda r: lock(r, problems=["transformers is 5.23.0, the lock has 4.57.1"]),
        "lockfile",
        "fail",
        "transformers is 5.23.0, the lock has 4.57.1",
        "pip install --no-deps --require-hashes",
    ),
    (
        "platform libraries differ from the lock",
        lambda r: lock(r, platform=["cuda-bindings 13.3.1 comes with the platform but the lock has 13.5.0"]),
        "lockfile",
        "warn",
        "cuda-bindings 13.3.1",
        "rent the platform image the lock was made for",
    ),
    (
        "drift, no lock claimed",
        lambda r: lock(r, problems=["peft is 0.21.2, the lock has 0.17.0"], claimed=False),
        "lockfile",
        "warn",
        "peft is 0.21.2",
        "set it up with samebox",
    ),
    (
        "lock unclaimed and not generated",
        lambda r: lock(r, missing=True, claimed=False),
        "lockfile",
        "n/a",
        "no lockfile",
        "",
    ),
    (
        "lock not generated",
        lambda r: lock(r, missing=True),
        "lockfile",
        "warn",
        "does not exist",
        "make lock",
    ),
    (
        "no lock",
        lambda r: r.update(lockfile={"lockfile": None, "chosen_by": "no catalog image has torch 2.4.0"}),
        "lockfile",
        "n/a",
        "no catalog image",
        "SAMEBOX_LOCKFILE",
    ),
    ("small shm", lambda r: r["shm"].update(total_bytes=64 * 2**20), "shm", "warn", "64.0 MiB", "--shm-size"),
    (
        "data dir full",
        lambda r: r["data_dir"].update(free_bytes=GiB),
        "data_dir",
        "fail",
        "1.0 GiB free",
        "free space",
    ),
    (
        "data dir ro",
        lambda r: r["data_dir"].update(write_error="Read-only file system (OSError, errno 30)"),
        "data_dir",
        "fail",
        "Read-only file system",
        "writable data disk",
    ),
    (
        "data dir under a file",
        lambda r: r.update(
            data_dir={"path": "/f/run", "exists": False, "judged": "/f", "not_a_directory": "/f"}
        ),
        "data_dir",
        "fail",
        "/f is a file",
        "output.dir",
    ),
    (
        "data dir slow",
        lambda r: r["data_dir"].update(write_mbps=12.0),
        "data_dir",
        "warn",
        "12 MB/s",
        "local data disk",
    ),
    (
        "hf cache on system disk",
        lambda r: [r["hf_cache"][k].update(total_bytes=30 * GiB, device=1) for k in ("fs", "root_fs")],
        "hf_cache",
        "warn",
        "30.0 GiB system disk",
        "HF_HOME",
    ),
    (
        "only math sdpa",
        lambda r: r.update(
            sdpa_backends={"flash_attention": "No available kernel", "math": True,
                           "efficient_attention": "No available kernel"}
        ),
        "sdpa_backends",
        "warn",
        "only torch's math",
        "",
    ),
    (
        "probe crashed",
        lambda r: r.update(matmul_accuracy={"probe_error": "RuntimeError: CUDA error: unknown error"}),
        "matmul_accuracy",
        "fail",
        "CUDA error: unknown error",
        "driver or GPU",
    ),
    (
        "bnb missing",
        lambda r: r.update(
            bitsandbytes={"installed": False, "import_error": "ModuleNotFoundError: No module named 'bitsandbytes'"}
        ),
        "bitsandbytes",
        "warn",
        "not installed",
        "lockfile pins",
    ),
    (
        "bnb nf4 broken",
        lambda r: r.update(
            bitsandbytes={
                "installed": True,
                "version": "0.50.2",
                "nf4_error": "CUDA Setup failed",
                "adamw8bit_changed": True,
                "adamw8bit_finite": True,
            }
        ),
        "bitsandbytes",
        "fail",
        "CUDA Setup failed",
        "reinstall bitsandbytes",
    ),
    (
        "flash-attn missing",
        lambda r: r.update(
            flash_attn={"installed": False, "import_error": "ModuleNotFoundError: No module named 'flash_attn'"}
        ),
        "flash_attn",
        "warn",
        "not installed",
        "samebox wheel flash-attn --from-env --arch 9.0 --install",
    ),
    (
        "flash-attn abi",
        lambda r: r.update(
            flash_attn={
                "installed": False,
                "import_error": "ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2E",
            }
        ),
        "flash_attn",
        "fail",
        "undefined symbol",
        "--arch 9.0 --profile full",
    ),
    (
        "flash-attn sm80 only",
        lambda r: fa(r, elf_archs=["8.0"]),
        "flash_attn",
        "fail",
        "kernels for sm_80 only; this GPU is sm_90",
        "samebox wheel flash-attn --from-env --arch 9.0 --profile full",
    ),
    (
        "flash-attn no kernel image",
        lambda r: fa(
            r,
            elf_archs=None,
            cases={"128": {"error": "CUDA error: no kernel image is available for execution on the device"}},
        ),
        "flash_attn",
        "fail",
        "no kernel image is available",
        "--arch 9.0 --profile full",
    ),
    (
        "flash-attn wrong numbers",
        lambda r: fa(r, cases={"128": {"out": 0.3, "dq": 0.1, "dk": 0.1, "dv": 0.1}}),
        "flash_attn",
        "fail",
        "worst relative error 3.0e-01 (out)",
        "--profile full",
    ),
    (
        "slim build, model needs window",
        lambda r: (fa(r), needs_window(r)),
        "flash_attn",
        "fail",
        "built without sliding-window (local) attention",
        "--arch 9.0 --profile full",
    ),
    (
        "lean build, model with head dim 80",
        lambda r: lean_build_phi2(r),
        "flash_attn",
        "fail",
        "built without head dims other than 32, 64, 96, 128, 192, 256, which /phi2/config.json needs",
        "--profile full",
    ),
]


# Faults of full-mode checks, injected into the full capture.
FULL_FAULTS = [
    (
        "loss rising",
        lambda r: r["lora_smoke"].update(losses=[5.0, 5.1, 5.2, 5.3, 5.4]),
        "lora_smoke",
        "fail",
        "did not fall",
        "reinstall",
    ),
    (
        "loss nan",
        lambda r: r["lora_smoke"].update(losses=[5.0, float("nan"), 5.2, 5.3, 4.0]),
        "lora_smoke",
        "fail",
        "not finite",
        "matmul_accuracy",
    ),
]


@pytest.mark.parametrize("fault", FAULTS + FULL_FAULTS, ids=[f[0] for f in FAULTS + FULL_FAULTS])
def test_fault_is_caught(healthy, healthy_full, fault) -> None:
    assert_fault_caught(healthy_full if fault in FULL_FAULTS else healthy, fault)


def test_slim_build_is_fine_when_the_model_does_not_need_its_features(healthy) -> None:
    fa(healthy)
    assert set(severities(healthy, "flash_attn")) == {"ok"}
    assert any("built without sliding-window" in f.message for f in findings(healthy, "flash_attn"))


def test_lean_build_and_a_padded_head_dim_fail_twice_and_nothing_says_ok(healthy) -> None:
    lean_build_phi2(healthy)
    found = findings(healthy, "flash_attn")
    assert [f.severity for f in found] == ["fail", "fail"]
    assert "head dim 80" in found[0].message and LEAN_GUARD in found[0].message
    assert "built without head dims other than 32, 64, 96, 128, 192, 256" in found[1].message
    assert "model.attention=sdpa" in found[1].remediation


def test_healthy_flash_attn_and_bitsandbytes(healthy) -> None:
    fa(healthy, features=FULL_BUILD)
    assert severities(healthy, "flash_attn") == ["ok", "ok"]
    assert severities(healthy, "bitsandbytes") == ["ok", "ok"]  # the capture's bitsandbytes 0.50.2


def test_full_build_runs_a_sliding_window_model(healthy) -> None:
    fa(healthy, features=FULL_BUILD, window_case={"out": 2e-3, "dq": 3e-3, "dk": 3e-3, "dv": 2e-3})
    needs_window(healthy)
    assert set(severities(healthy, "flash_attn")) == {"ok"}


def test_full_mode_faults(healthy_full) -> None:
    healthy_full["memory_pattern"]["mismatches"] = 17
    healthy_full["repeatability"]["differing"] = 2
    healthy_full["load"]["tflops_windows"][10] = 350.0
    assert severities(healthy_full, "memory_pattern") == ["fail"]
    assert "silent data corruption" in findings(healthy_full, "repeatability")[0].message
    assert severities(healthy_full, "load_steadiness") == ["warn"]
