"""Official wheel names and URLs by flash-attn's naming scheme (setup.py get_wheel_url), per release."""

from __future__ import annotations

import pytest

from builder.wheels.key import WheelKey
from builder.wheels.release import release_wheel


@pytest.mark.parametrize("key, name", [
    (WheelKey("2.7.4.post1", "2.3.0+cu121", "12.1", "cp312", False, ("8.0", "9.0"), "full"),
     "flash_attn-2.7.4.post1+cu12torch2.3cxx11abiFALSE-cp312-cp312-linux_x86_64.whl"),
    (WheelKey("2.6.3", "2.3.0+cu121", "12.1", "cp312", False, ("8.0", "9.0"), "full"),
     "flash_attn-2.6.3+cu123torch2.3cxx11abiFALSE-cp312-cp312-linux_x86_64.whl"),
    (WheelKey("2.6.3", "2.1.2+cu118", "11.8", "cp310", False, ("8.0",), "full"),
     "flash_attn-2.6.3+cu118torch2.1cxx11abiFALSE-cp310-cp310-linux_x86_64.whl"),
    (WheelKey("2.8.3", "2.8.0+cu128", "12.8", "cp312", True, ("9.0", "12.0"), "full"),
     "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"),
    (WheelKey("2.8.3", "2.5.1+cu124", "12.4", "cp311", False, ("8.0",), "full"),
     "flash_attn-2.8.3+cu12torch2.5cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"),
])
def test_release_names(key, name, monkeypatch):
    monkeypatch.delenv("SAMEBOX_FA_RELEASE_BASE", raising=False)
    rw = release_wheel(key)
    assert rw.name == name
    assert rw.url == ("https://github.com/Dao-AILab/flash-attention/releases/download/"
                      f"v{key.flash_attn}/{name.replace('+', '%2B')}")


@pytest.mark.parametrize("key, reason", [
    (WheelKey("2.8.3", "2.11.0+cu130", "13.0", "cp312", True, ("9.0",), "full"), "no CUDA 13 wheels"),
    (WheelKey("2.8.3", "2.3.0+cu121", "12.1", "cp312", False, ("9.0",), "full"), "not 2.3"),
    (WheelKey("2.7.4.post1", "2.5.1+cu124", "12.4", "cp312", False, ("12.0",), "full"), "not 12.0"),
    (WheelKey("2.7.4.post1", "2.5.1+cu124", "12.4", "cp312", False, ("9.0",), "slim"), "full profile"),
    (WheelKey("2.6.3", "2.3.0+cu121", "12.1", "cp313", False, ("9.0",), "full"), "no Python 3.13"),
])
def test_no_official_wheel(key, reason):
    rw = release_wheel(key)
    assert rw.url is None and reason in rw.reason


def test_release_base_from_env():
    key = WheelKey("2.7.4.post1", "2.3.0+cu121", "12.1", "cp312", False, ("9.0",), "full")
    rw = release_wheel(key, {"SAMEBOX_FA_RELEASE_BASE": "http://127.0.0.1:9/rel/"})
    assert rw.url.startswith("http://127.0.0.1:9/rel/v2.7.4.post1/flash_attn-2.7.4.post1%2Bcu12")
