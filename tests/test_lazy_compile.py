"""builder/core/lazy_compile.py: torch.compile deferred to a function's first call while libraries import, the
real one back afterwards, and bitsandbytes' import no longer pulling in TorchInductor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from builder.core.lazy_compile import compile_on_first_call


@pytest.fixture
def counted(monkeypatch):
    """A stand-in for the real torch.compile that counts its calls and doubles the result."""
    calls = []

    def fake(model=None, **kwargs):
        calls.append((model, kwargs))
        return lambda *a, **k: 2 * model(*a, **k)

    monkeypatch.setattr(torch, "compile", fake)
    return fake, calls


def test_a_function_compiles_on_its_first_call_only(counted) -> None:
    fake, calls = counted
    with compile_on_first_call():
        assert torch.compile is not fake

        def add(a, b):
            return a + b

        wrapped = torch.compile(add, dynamic=False)

        @torch.compile(fullgraph=True)  # the decorator-factory form
        def one():
            return 1

    assert torch.compile is fake and calls == []  # nothing compiled, the real one back
    assert wrapped.__name__ == "add" and wrapped(1, 2) == 6 and wrapped(2, 2) == 8
    assert one() == 2
    assert calls == [(add, {"dynamic": False}), (one.__wrapped__, {"fullgraph": True})]


def test_a_module_is_compiled_at_once_and_the_real_one_returns_after_an_error(counted) -> None:
    fake, calls = counted
    module = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="boom"), compile_on_first_call():
        torch.compile(module, mode="max-autotune")
        raise RuntimeError("boom")
    assert calls == [(module, {"mode": "max-autotune"})] and torch.compile is fake


IMPORT = """
import sys, torch
from builder.core.lazy_compile import compile_on_first_call
if sys.argv[1] == "deferred":
    with compile_on_first_call():
        import bitsandbytes
else:
    import bitsandbytes
print("torch._inductor.compile_fx" in sys.modules)
"""


@pytest.mark.slow  # two interpreters importing torch and bitsandbytes (locked in the dev environment)
def test_bitsandbytes_imports_without_torch_inductor() -> None:
    seen = {mode: subprocess.run([sys.executable, "-c", IMPORT, mode], capture_output=True, text=True, check=True)
            .stdout.strip().splitlines()[-1] for mode in ("deferred", "plain")}
    assert seen == {"deferred": "False", "plain": "True"}
