"""Wheel keys from catalog images and from live-environment facts, and the archs flash-attn can build."""

from __future__ import annotations

from dataclasses import replace

import pytest

from builder.core.catalog import Catalog
from builder.core.errors import SameboxError
from builder.core.spec import find_image, load_catalog
from builder.wheels.key import WheelKey, build_archs, key_from_env, key_from_spec
from tests.envs import make_env

H100 = ("NVIDIA H100 80GB HBM3", "9.0")


def test_key_from_catalog_image():
    catalog = load_catalog()
    key = key_from_spec(find_image("torch2.3-cu121-py312", catalog))
    assert key == WheelKey("2.7.4.post1", "2.3.0+cu121", "12.1", "cp312", False, ("8.0", "9.0"), "full")
    narrowed = key_from_spec(find_image("torch2.11-cu130-py312", catalog), ["9.0"], "slim")
    assert (narrowed.archs, narrowed.cxx11abi, narrowed.torch, narrowed.flash_attn) == (
        ("9.0",), True, "2.11.0+cu130", "2.8.3")


def test_key_from_env_uses_gpus_and_catalog_version():
    facts = make_env("2.11.0+cu130", "13.0", "3.12", (H100, ("NVIDIA A10", "8.6")))
    key = key_from_env(facts, catalog=Catalog.load())
    assert key == WheelKey("2.8.3", "2.11.0+cu130", "13.0", "cp312", True, ("8.0", "9.0"), "full")
    assert key_from_env(facts, ["12.0"], "slim").archs == ("12.0",)


def test_key_id_and_local_version_tell_keys_apart():
    key = WheelKey("2.8.3", "2.11.0+cu130", "13.0", "cp312", True, ("8.0", "9.0"), "slim")
    assert key.local_version == "cu130torch2.11cxx11abitrue.sm80.sm90.slim"
    assert key.id.startswith("fa2.8.3-torch2.11.0+cu130-cp312-abi1-sm80_90-slim-")
    others = [replace(key, profile="full"), replace(key, archs=("9.0",)), replace(key, cxx11abi=False),
              replace(key, torch="2.11.0+cu128"), replace(key, python="cp311")]
    assert len({key.id, *(k.id for k in others)}) == 6
    assert WheelKey.from_dict(key.to_dict()) == key


@pytest.mark.parametrize("caps, archs", [
    (["8.0"], ("8.0",)), (["8.6", "8.9"], ("8.0",)), (["9.0", "8.6"], ("8.0", "9.0")),
    (["10.0"], ("10.0",)), (["12.0", "12.1"], ("12.0",)),
])
def test_build_archs(caps, archs):
    assert build_archs(caps) == archs


@pytest.mark.parametrize("caps, message", [
    (["7.5"], "sm_75: flash-attn 2 needs Ampere or newer; the trainer will use SDPA"),
    (["7.0", "9.0"], "sm_70: flash-attn 2 needs Ampere"),
    (["11.0"], "none runs on 11.0"),
    (["sm90"], "not a compute capability"),
])
def test_build_archs_refuses(caps, message):
    with pytest.raises(SameboxError) as e:
        build_archs(caps)
    assert message in str(e.value)


@pytest.mark.parametrize("facts, archs, message", [
    (make_env("2.11.0+cpu", None), None, "CPU build"),
    (make_env(None, None), None, "torch is not importable"),
    (make_env(), None, "no GPU visible and no --arch"),
    (make_env(gpus=(("Tesla T4", "7.5"),)), None, "needs Ampere or newer"),
])
def test_key_from_env_bad_input(facts, archs, message):
    with pytest.raises(SameboxError, match=message):
        key_from_env(facts, archs)


def test_unknown_profile_and_version():
    spec = find_image("torch2.3-cu121-py312", load_catalog())
    with pytest.raises(SameboxError, match="use one of: full, slim"):
        key_from_spec(spec, profile="tiny")
    with pytest.raises(SameboxError, match="known versions"):
        key_from_spec(spec, version="2.5.0")
