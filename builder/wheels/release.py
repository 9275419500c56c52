"""The official prebuilt flash-attn wheel for a key: its name by flash-attn's own scheme (setup.py get_wheel_url),
its release URL, and a download that keeps the file only when its tags match the key.

Name: flash_attn-{version}+cu{cuda}torch{M.m}cxx11abi{TRUE|FALSE}-{cpXY}-{cpXY}-linux_x86_64.whl, where {cuda} is
the major (cu12) from 2.7.0 on and major+minor of the one toolkit per major that release built with (cu118, cu123)
before. The host is $SAMEBOX_FA_RELEASE_BASE when set (tests point it at a local server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from builder.core import settings
from builder.core.environment import sm_list
from builder.core.errors import SameboxError
from builder.core.settings import AUTODL_TURBO
from builder.wheels.key import WheelKey, release_facts

DEFAULT_BASE = "https://github.com/Dao-AILab/flash-attention/releases/download"


@dataclass(frozen=True)
class ReleaseWheel:
    name: str | None  # None: this release published no wheel for the key
    url: str | None
    reason: str  # why there is none, or which archs it covers


def release_base(env: dict[str, str] | None = None) -> str:
    return settings.flash_attn_release_base(DEFAULT_BASE, env)


def release_cuda_tag(version: str, cuda: str) -> str | None:
    """The CUDA part of the official name for a torch built with ``cuda``: '12' or '123'; None if not built."""
    major = cuda.split(".")[0]
    for tag in release_facts(version).wheel_cuda:
        if tag.split(".")[0] == major:
            return tag.replace(".", "")
    return None


def release_wheel(key: WheelKey, env: dict[str, str] | None = None) -> ReleaseWheel:
    """Which official wheel would fit ``key``, with the reason when none does (no request is made)."""
    release = release_facts(key.flash_attn)
    cuda = release_cuda_tag(key.flash_attn, key.cuda)
    if key.profile != "full":
        return ReleaseWheel(None, None, f"official wheels are the full profile, the key wants {key.profile}")
    if cuda is None:
        return ReleaseWheel(None, None, f"flash-attn {key.flash_attn} published no CUDA {key.cuda.split('.')[0]} "
                                        f"wheels (only {', '.join(release.wheel_cuda)})")
    if key.torch_minor not in release.torch:
        return ReleaseWheel(None, None, f"flash-attn {key.flash_attn} published wheels for torch "
                                        f"{', '.join(release.torch)}, not {key.torch_minor}")
    py = f"{key.python[2]}.{key.python[3:]}"
    if py not in release.python:
        return ReleaseWheel(None, None, f"flash-attn {key.flash_attn} published no Python {py} wheels")
    missing = [a for a in key.archs if a not in release.release_archs]
    if missing:
        return ReleaseWheel(None, None, f"official wheels hold sm_{', sm_'.join(release.release_archs)}; "
                                        f"not {', '.join(missing)}")
    abi = "TRUE" if key.cxx11abi else "FALSE"
    name = (f"flash_attn-{key.flash_attn}+cu{cuda}torch{key.torch_minor}cxx11abi{abi}"
            f"-{key.python}-{key.python}-linux_x86_64.whl")
    url = f"{release_base(env)}/v{key.flash_attn}/{name.replace('+', '%2B')}"
    covers = sm_list(release.release_archs)
    return ReleaseWheel(name, url, f"covers {covers}")


def download(url: str, name: str, dest_dir: Path, timeout: float = 60.0) -> Path | None:
    """Fetch ``url`` into ``dest_dir``/``name`` atomically; None when the host says it has no such file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        dest = dest_dir / name
        os.replace(tmp, dest)
        return dest
    except urllib.error.HTTPError as e:
        if e.code in (403, 404):
            return None
        raise SameboxError(f"{url}: HTTP {e.code}", "retry later, or use --offline to build from source") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SameboxError(f"cannot reach {url}: {getattr(e, 'reason', e)}",
                           f"check the network (on AutoDL: source {AUTODL_TURBO}) or pass --offline") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

