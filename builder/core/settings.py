"""Every SAMEBOX_* variable samebox reads and every location it keeps things in, decided here and nowhere else.

Each reader takes the environment as an optional mapping (tests pass their own) and falls back to a default that
depends only on the machine: AutoDL's data disk and region-shared file system, the home directory. Standard library
only: setup.sh runs builder.instance.converge with a bare interpreter before anything is installed.

Locations:
- the catalog root (images/, lockfiles/): $SAMEBOX_ROOT, else the checkout or installed copy samebox runs from
- the instance's state (env.sh, the claimed lock, step records): $SAMEBOX_STATE, else ~/.samebox
- the instance's caches (HF_HOME, pip, torch, uv): --cache-dir or $SAMEBOX_CACHE_DIR, else AutoDL's data disk,
  else its region-shared disk, else ~, each under .cache
- the flash-attn wheel cache: $SAMEBOX_WHEEL_CACHE, else AutoDL's region-shared disk (every instance of a region
  finds a wheel built once), else the instance's caches: setup, `samebox wheel` and the self-test agree
- the trainer's tokenized-data cache: $SAMEBOX_CACHE/tokenized, else ~/.cache/samebox/tokenized
- the installed files' check findings (fingerprint, verify, setup): $SAMEBOX_FILE_CHECKS (setup points it next to
  the wheel cache: the clones of one image in a region share them), else the instance's state
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PREFIX = "SAMEBOX_"  # every variable below; the fingerprint records them (no secrets among them but the API key)

# AutoDL's paths. /etc/profile.d/autodl.env.sh holds a panel token and is never read.
AUTODL_TURBO = Path("/etc/network_turbo")
AUTODL_DATA_DISK = Path("/root/autodl-tmp")
AUTODL_SHARED_FS = Path("/root/autodl-fs")

DEFAULT_VENV = Path("/opt/samebox/venv")  # where setup makes a venv when the platform's Python cannot be used
DEFAULT_MIN_FREE_MB = 2048
# samebox's own source: what an image copies in and what the setup script installs (and hashes) from a checkout.
SOURCE_PARTS = ("pyproject.toml", "README.md", "builder", "trainer")


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _home(environ: Mapping[str, str] | None) -> Path:
    return Path(_env(environ).get("HOME") or os.path.expanduser("~"))


def get(name: str, environ: Mapping[str, str] | None = None, default: str = "") -> str:
    """$SAMEBOX_<name>, '' (or ``default``) when unset or empty."""
    return _env(environ).get(PREFIX + name, "") or default


# --- the catalog and the instance ---------------------------------------------------------------------------------


def project_root(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding images/ and lockfiles/: $SAMEBOX_ROOT, else the checkout this package sits in."""
    return Path(get("ROOT", environ)) if get("ROOT", environ) else Path(__file__).resolve().parents[2]


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    value = get("STATE", environ)
    return Path(os.path.abspath(value)) if value else _home(environ) / ".samebox"


def venv_dir(environ: Mapping[str, str] | None = None) -> Path:
    return Path(os.path.abspath(get("VENV", environ) or DEFAULT_VENV))


def lockfile(environ: Mapping[str, str] | None = None) -> str:
    """The lock setup.sh installed ($SAMEBOX_LOCKFILE, written to env.sh)."""
    return get("LOCKFILE", environ)


def image(environ: Mapping[str, str] | None = None) -> str:
    """The catalog image this instance or image replicates ($SAMEBOX_IMAGE)."""
    return get("IMAGE", environ)


def python(environ: Mapping[str, str] | None = None) -> str:
    return get("PYTHON", environ)


def min_free_mb(environ: Mapping[str, str] | None = None) -> str:
    """As given (the caller checks it is a number): $SAMEBOX_MIN_FREE_MB, else the default."""
    return get("MIN_FREE_MB", environ) or str(DEFAULT_MIN_FREE_MB)


def flash_attn_profile(environ: Mapping[str, str] | None = None) -> str:
    """$SAMEBOX_FA_PROFILE, '' when unset (the caller's default is the catalog's first profile)."""
    return get("FA_PROFILE", environ)


def cache_dir_override(environ: Mapping[str, str] | None = None) -> Path | None:
    value = get("CACHE_DIR", environ)
    return Path(os.path.abspath(value)) if value else None


def instance_cache(explicit: Path | None, data_disk: str = "", shared_fs: str = "",
                   environ: Mapping[str, str] | None = None) -> Path:
    """Where an instance's caches go: ``explicit`` (--cache-dir or $SAMEBOX_CACHE_DIR), else AutoDL's data disk,
    else its region-shared disk, else ~; under .cache. Never the 30 GB system disk where AutoDL has another."""
    if explicit:
        return explicit
    return Path(data_disk or shared_fs or _home(environ)) / ".cache"


def wheel_cache(environ: Mapping[str, str] | None = None, caches: Path | None = None,
                shared_fs: Path | None = None) -> Path:
    """The flash-attn wheel cache: $SAMEBOX_WHEEL_CACHE, else samebox/wheels on AutoDL's region-shared disk
    (``shared_fs``, default /root/autodl-fs) where it exists, else samebox/wheels under ``caches`` (the instance's
    caches; default ~/.cache)."""
    value = get("WHEEL_CACHE", environ)
    if value:
        return Path(value)
    shared = AUTODL_SHARED_FS if shared_fs is None else shared_fs
    if shared.is_dir():
        return shared / "samebox" / "wheels"
    return (caches or _home(environ) / ".cache") / "samebox" / "wheels"


def file_checks(environ: Mapping[str, str] | None = None) -> Path:
    """Where the findings of installed-file checks are kept (builder/instance/fingerprint.py check_files):
    $SAMEBOX_FILE_CHECKS, else file-checks.json in the instance's state."""
    value = get("FILE_CHECKS", environ)
    return Path(value) if value else state_dir(environ) / "file-checks.json"


def region_dir(wheels: Path) -> Path:
    """What samebox shares beside its wheel cache (``wheels``; region-shared on AutoDL): samebox/ when the cache is
    samebox/wheels, else the wheel cache a user chose itself."""
    return wheels.parent if wheels.name == "wheels" and wheels.parent.name == "samebox" else wheels


def shared_file_checks(wheels: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The findings file setup.sh points $SAMEBOX_FILE_CHECKS at: the user's own, else beside samebox's wheel cache
    (``wheels``; region-shared where the wheels are), or inside a wheel cache the user chose."""
    value = get("FILE_CHECKS", environ)
    if value:
        return Path(value)
    return region_dir(wheels) / "file-checks.json"


KERNEL_CACHES = (("CUDA_CACHE_PATH", "cuda"), ("TRITON_CACHE_DIR", "triton"),
                 ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"))


def kernel_caches(wheels: Path, environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The compiled-kernel caches setup.sh points the libraries at, beside the wheel cache: the CUDA driver's JIT
    cache (PTX compiled for this GPU), Triton's and TorchInductor's. Each keys its entries by the code, the compiler
    and the GPU, so instances of a region share them: a second instance's first run loads what the first compiled
    instead of compiling it again in a fresh home directory. A variable the user set already is left to them (not
    in the result). The caches have no size limit of samebox's: the libraries bound their own (CUDA's 256 MiB by
    default), Triton's and TorchInductor's grow with the kernels compiled (a few MB per model)."""
    kernels = region_dir(wheels) / "kernels"
    env = _env(environ)
    return {name: kernels / sub for name, sub in KERNEL_CACHES if not env.get(name)}


# --- networks ------------------------------------------------------------------------------------------------------


def ca_bundle_override(environ: Mapping[str, str] | None = None) -> str:
    """$SAMEBOX_CA_BUNDLE: the proxy CA samebox passes to builds and resolvers before SSL_CERT_FILE and the like."""
    return get("CA_BUNDLE", environ)


def flash_attn_release_base(default: str, environ: Mapping[str, str] | None = None) -> str:
    """Where flash-attn's release wheels are downloaded from ($SAMEBOX_FA_RELEASE_BASE: a mirror)."""
    return get("FA_RELEASE_BASE", environ, default).rstrip("/")


def engine_client(engine: str, environ: Mapping[str, str] | None = None) -> str:
    """$SAMEBOX_DOCKER, $SAMEBOX_PODMAN, ...: a container engine's client binary to try before PATH."""
    return get(engine.upper(), environ)


# --- the trainer and the server -----------------------------------------------------------------------------------


def tokenized_cache(environ: Mapping[str, str] | None = None) -> Path:
    value = get("CACHE", environ)
    return (Path(value) if value else _home(environ) / ".cache" / "samebox") / "tokenized"


def fused_kernels(environ: Mapping[str, str] | None = None) -> str:
    """For diagnosis: $SAMEBOX_FUSED_KERNELS=torch|liger forces a kernel set (default auto)."""
    return get("FUSED_KERNELS", environ, "auto")


def fused_attention(environ: Mapping[str, str] | None = None) -> str:
    """For diagnosis: $SAMEBOX_FUSED_ATTENTION=flash_attn|torch_varlen|sdpa forces an attention backend."""
    return get("FUSED_ATTENTION", environ)


def mlp_chunk_tokens(environ: Mapping[str, str] | None = None) -> int | None:
    """For diagnosis: $SAMEBOX_MLP_CHUNK_TOKENS=N runs the fused layers' MLP N tokens at a time (default: sized by
    trainer/fused/decoder.py); None when unset or not a positive number."""
    value = get("MLP_CHUNK_TOKENS", environ)
    return int(value) if value.isdigit() and int(value) > 0 else None


def offload_in_flight(environ: Mapping[str, str] | None = None) -> int | None:
    """For diagnosis: $SAMEBOX_OFFLOAD_IN_FLIGHT=N lets N layers' activation copies to the host run at once before
    the forward pass waits for the oldest (0: no bound); None when unset or not a number."""
    value = get("OFFLOAD_IN_FLIGHT", environ)
    return int(value) if value.isdigit() else None


def pin_memory(environ: Mapping[str, str] | None = None) -> bool:
    """$SAMEBOX_PIN_MEMORY=0 turns off pinned host memory for offloaded layers."""
    return get("PIN_MEMORY", environ, "1") != "0"


API_KEY_VARIABLE = PREFIX + "API_KEY"


def api_key(environ: Mapping[str, str] | None = None) -> str:
    """$SAMEBOX_API_KEY: the key `samebox serve` requires when --api-key is not given ('' for none)."""
    return get("API_KEY", environ)
