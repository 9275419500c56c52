"""Environments built by hand for tests: what ``Environment.probe()`` would return on another machine."""

from __future__ import annotations

from builder.core.environment import Capability, Environment, Gpu, TorchBuild


def make_env(torch: str | None = "2.11.0+cu130", cuda: str | None = "13.0", python: str = "3.12",
             gpus: tuple[tuple[str, str], ...] = (), cxx11abi: bool = True, driver: str = "",
             executable: str = "/usr/bin/python3") -> Environment:
    """``torch`` None: not installed. ``gpus``: (name, capability '9.0') pairs."""
    build = TorchBuild(version=torch, cuda=cuda, cxx11abi=cxx11abi) if torch else None
    return Environment(python=python, python_full=f"{python}.3", executable=executable, torch=build,
                       gpus=tuple(Gpu(name, Capability.parse(cap)) for name, cap in gpus), driver=driver)
