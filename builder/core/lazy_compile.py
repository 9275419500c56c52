"""Importing the GPU libraries without the seconds they spend on code a run never calls.

bitsandbytes wraps its device-less ("default") kernels in ``torch.compile`` when it is imported (and peft imports it
wherever it is installed). ``torch.compile(fn)`` compiles nothing until the first call, but it imports TorchDynamo's
compile path and TorchInductor at once: 1-2 s of a start, for kernels a CUDA QLoRA run does not call. While
``compile_on_first_call()`` is active, ``torch.compile(fn, **kwargs)`` returns a function that makes the real
``torch.compile(fn, **kwargs)`` on its first call and calls that: the same behaviour, minus the import. Modules
(``torch.compile(model)``) and anything but a plain function get the real one at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def _deferred(real: Callable[..., Any]) -> Callable[..., Any]:
    def compile(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # @torch.compile(dynamic=False) as a decorator factory
            return lambda fn: compile(fn, **kwargs)
        if not inspect.isfunction(model):
            return real(model, **kwargs)
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kw: Any) -> Any:
            if not compiled:
                compiled.append(real(model, **kwargs))
            return compiled[0](*args, **kw)

        return first_call_compiles

    return compile


@contextmanager
def compile_on_first_call() -> Iterator[None]:
    """``torch.compile`` deferred to each function's first call while the block runs (one thread imports; nothing
    else in the process compiles meanwhile); the real one is back afterwards, whatever happened."""
    import torch

    real = torch.compile
    torch.compile = _deferred(real)
    try:
        yield
    finally:
        torch.compile = real
