"""The compatibility tables answer the questions users ask."""

from __future__ import annotations

import pytest

from builder.core import compat
from builder.core.environment import Capability


@pytest.mark.parametrize(
    ("name", "cc"),
    [("RTX 4090", "8.9"), ("4090D", "8.9"), ("NVIDIA GeForce RTX 4090 D", "8.9"), ("H20", "9.0"), ("A800-80GB", "8.0"),
     ("vGPU-32GB", "8.9"), ("RTX 5090", "12.0"), ("V100-32GB", "7.0"), ("NVIDIA H100 80GB HBM3", "9.0"),
     ("NVIDIA A100-SXM4-80GB", "8.0"), ("RTX 3090", "8.6")],
)
def test_gpu_names(name: str, cc: str) -> None:
    found = compat.gpu_capability(name)
    assert found is not None and found[0] == cc


def test_unknown_gpu() -> None:
    assert compat.gpu_capability("Voodoo 5") is None


def test_arch_compatibility() -> None:
    assert Capability.parse("8.9").runs("8.6")
    assert not Capability.parse("8.9").runs("9.0")
    assert not Capability.parse("12.0").runs("9.0")


def test_driver_minimums() -> None:
    assert compat.driver_supports("535.104.05", "12.1")
    assert not compat.driver_supports("525.60.13", "12.1")
    assert compat.driver_supports("580.159.04", "13.0")
    assert not compat.driver_supports("570.86", "12.9")
    assert compat.min_driver("12.5") == compat.CUDA_MIN_DRIVER["12.4"]


def test_every_torch_cuda_variant_has_arch_and_driver_facts() -> None:
    for minor, release in compat.TORCH_RELEASES.items():
        assert release.pypi_cuda in release.cuda, minor
        for cuda in release.cuda:
            assert cuda in compat.TORCH_ARCHES, (minor, cuda)
            assert compat.min_driver(cuda), (minor, cuda)


def test_flash_attn_profiles_nest_and_setup_script_knows_each() -> None:
    full, slim, lean = (set(compat.FLASH_ATTN_PROFILES[p]) for p in ("full", "slim", "lean"))
    assert full == set() and slim < lean and lean - slim == {"FLASHATTENTION_DISABLE_UNEVEN_K"}
    assert set(compat.FLASH_ATTN_OBJECT_SECONDS) == set(compat.FLASH_ATTN_PROFILES)
    # every command that takes a profile accepts each one and refuses another name
    from builder.cli import build_parser
    from builder.instance.converge import parse_options

    parser = build_parser()
    for profile in compat.FLASH_ATTN_PROFILES:
        assert parser.parse_args(["wheel", "flash-attn", "--from-env", "--profile", profile]).profile == profile
        assert parser.parse_args(["render", "--torch", "2.3", "--flash-attn-profile", profile]).flash_attn_profile \
            == profile
        assert parse_options(["--flash-attn-profile", profile], {}).flash_attn_profile == profile
    with pytest.raises(SystemExit):
        parser.parse_args(["wheel", "flash-attn", "--from-env", "--profile", "turbo"])
    assert parser.parse_args(["wheel", "flash-attn", "--from-env"]).profile == compat.DEFAULT_FLASH_ATTN_PROFILE


def test_head_dims_flash_attn_runs_unpadded() -> None:
    # flash_api.cpp (2.8.3): head_size_rounded = round_multiple(head_size, head_size <= 128 ? 32 : 64)
    def rounded(d: int) -> int:
        step = 32 if d <= 128 else 64
        return -(-d // step) * step

    assert [d for d in range(8, 257, 8) if compat.flash_attn_head_dim_even(d)] == [
        d for d in range(8, 257, 8) if rounded(d) == d] == [32, 64, 96, 128, 192, 256]


def test_the_hardware_tables_are_data_checked_when_loaded(tmp_path) -> None:
    import json

    data = json.loads(compat.HARDWARE_TABLES.read_text())
    assert compat.GPU_CAPABILITY["H20"] == ("9.0", "H20") and compat.CUDA_MIN_DRIVER["12.1"] == "530.30.02"
    data["gpus"]["NEWCARD"] = ["9.0", "New Card"]  # a new GPU is a data edit
    good = tmp_path / "good.json"
    good.write_text(json.dumps(data))
    assert compat.load_tables(good)["gpus"]["NEWCARD"] == ["9.0", "New Card"]
    data["gpus"]["BROKEN"] = ["nine", "Broken"]
    data["cuda_min_driver"]["12.1"] = "latest"
    data["torch_releases"]["2.3"]["cuda"].append("99.9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        compat.load_tables(bad)
    for problem in ("gpus.BROKEN", "cuda_min_driver.12.1: 'latest'", "torch_releases.2.3: CUDA 99.9 has no"):
        assert problem in str(e.value)
