"""builder/wheels/kernelcheck.py, which the wheel verifier and the self-test share: the cuobjdump reader and the varlen
numeric check (run on the CPU here, with SDPA standing in for flash-attn, right and wrong)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from builder.core import compat
from builder.wheels import kernelcheck


def fake_cuobjdump(tmp_path, body: str) -> str:
    tool = tmp_path / "cuobjdump"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)
    return str(tool)


def test_elf_archs_reads_every_cubin_and_arch_specific_variants(tmp_path) -> None:
    listing = "".join(f"echo 'ELF file {i}: flash_attn_2_cuda.{i}.sm_{sm}.cubin'\n"
                      for i, sm in enumerate(["90a", "80", "100f", "80", "120"], 1))
    assert kernelcheck.elf_archs("/x.so", fake_cuobjdump(tmp_path, listing)) == ("8.0", "9.0", "10.0", "12.0")
    assert kernelcheck.elf_archs("/x.so", fake_cuobjdump(tmp_path, "echo 'no ELF in here'\n")) == ()


def test_elf_archs_raises_cuobjdumps_error(tmp_path) -> None:
    tool = fake_cuobjdump(tmp_path, "echo 'cuobjdump fatal : Could not open input file' >&2\nexit 255\n")
    with pytest.raises(kernelcheck.CuobjdumpError, match="Could not open input file"):
        kernelcheck.elf_archs("/x.so", tool)


def test_find_cuobjdump_prefers_the_toolkit_of_cuda_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(kernelcheck, "DEFAULT_CUDA_HOME", "/nonexistent")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "path").mkdir()
    for tool in (tmp_path / "cuda" / "bin" / "cuobjdump", tmp_path / "path" / "cuobjdump"):
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    env = {"CUDA_HOME": str(tmp_path / "cuda"), "PATH": str(tmp_path / "path")}
    assert kernelcheck.find_cuobjdump(env) == str(tmp_path / "cuda" / "bin" / "cuobjdump")
    assert kernelcheck.find_cuobjdump({"PATH": str(tmp_path / "path")}) == str(tmp_path / "path" / "cuobjdump")
    assert kernelcheck.find_cuobjdump({"PATH": "/nonexistent"}) is None


def sdpa_varlen(causal_mask: bool):
    """A varlen attention made of per-sequence SDPA (flash-attn's call signature): right when causal_mask, else
    wrong the way a kernel that ignores causality is."""
    import torch
    import torch.nn.functional as F

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size):
        outs = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal_mask).transpose(0, 1))
        return torch.cat(outs)

    return varlen


def test_varlen_errors_pass_a_right_kernel_and_catch_a_wrong_one() -> None:
    pytest.importorskip("torch")
    right = kernelcheck.varlen_errors(sdpa_varlen(True), head_dim=64, device="cpu", seqlens=(7, 33, 20), heads=2)
    assert set(right) == {"out", "dq", "dk", "dv"}
    assert max(right.values()) < compat.AGREEMENT_REL_ERROR
    wrong = kernelcheck.varlen_errors(sdpa_varlen(False), head_dim=64, device="cpu", seqlens=(7, 33, 20), heads=2)
    assert max(wrong.values()) > 10 * compat.AGREEMENT_REL_ERROR


def test_the_verifier_can_run_kernelcheck_in_a_python_without_builder(tmp_path) -> None:
    """numeric_check runs the file with runpy in the target interpreter, whose path holds only the wheel: it must
    load there without importing builder (here it stops at the missing flash_attn)."""
    run = f"import runpy; runpy.run_path({kernelcheck.__file__!r}, run_name='__main__')"
    res = subprocess.run([sys.executable, "-I", "-c", run], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "No module named 'flash_attn'" in res.stderr or "No module named 'torch'" in res.stderr, res.stderr
    assert "builder" not in res.stderr.replace(kernelcheck.__file__, "")
