"""Render an ImageSpec into a build context: Dockerfile (from images/Dockerfile.j2), lockfile, samebox's source,
and a bake file for the whole catalog. Output is deterministic: sorted inputs, no timestamps, stamped with the
command that regenerates it and the hash of its inputs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jinja2

from builder import __version__
from builder.core import compat, settings
from builder.core.errors import SameboxError
from builder.core.fsutil import sha256_file, sha256_text, write_atomic
from builder.core.settings import project_root
from builder.core.spec import ImageSpec
from builder.image import workstation as workstation_layer
from builder.image.lock import lockfile_sha256
from builder.image.reproducible import SOURCE_DATE_EPOCH

MINICONDA_BASE_URL = "https://repo.anaconda.com/miniconda/"
SOURCE_URL = "https://github.com/samebox/samebox"
# What of the checkout goes into an image as samebox's own source (the final, fast-changing layer).
SOURCE_ITEMS = (*settings.SOURCE_PARTS, "images", "configs")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


def default_tag(spec: ImageSpec) -> str:
    """Content-addressed: the image id plus the short lockfile hash."""
    return f"samebox:{spec.id}-{lockfile_sha256(spec)[:12]}"


def image_labels(spec: ImageSpec, lock_sha256: str, flash_attn_enabled: bool, profile: str) -> dict[str, str]:
    if flash_attn_enabled:
        fa = f"{spec.flash_attn} {profile} (samebox wheel flash-attn)"
    else:
        fa = "none: this image has no torch" if not spec.has_torch else "not built (--no-flash-attn)"
    return {
        "org.opencontainers.image.title": f"samebox {spec.id}",
        "org.opencontainers.image.description": f"torch {spec.torch_full}, CUDA {spec.cuda}, Python {spec.python}",
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.base.name": spec.base_ref,
        "io.samebox.image-id": spec.id,
        "io.samebox.lock-sha256": lock_sha256,
        "io.samebox.torch": spec.torch_full,
        "io.samebox.flash-attn": fa,
    }


def _template_env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(project_root() / "images")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_dockerfile(spec: ImageSpec, flash_attn: bool = True,
                      flash_attn_profile: str = compat.DEFAULT_FLASH_ATTN_PROFILE,
                      workstation: bool = False) -> str:
    """The Dockerfile for ``spec``. The flash-attn stage is there for images with torch unless ``flash_attn`` is off;
    ``workstation`` adds JupyterLab (its own lock) and the entrypoint that starts it and TensorBoard."""
    if flash_attn_profile not in compat.FLASH_ATTN_PROFILES:
        raise SameboxError(f"unknown flash-attn profile {flash_attn_profile!r}",
                           f"choose one of: {', '.join(compat.FLASH_ATTN_PROFILES)}")
    flash_attn_enabled = flash_attn and spec.has_torch
    template_path = project_root() / "images" / "Dockerfile.j2"
    lock = lockfile_sha256(spec)
    inputs = sha256_text(
        json.dumps(
            {"template": template_path.read_text(), "spec": {k: v for k, v in spec.to_dict().items()
                                                             if k not in ("root", "lockfile")},
             "lock": lock, "flash_attn": flash_attn_enabled, "profile": flash_attn_profile,
             "source_date_epoch": SOURCE_DATE_EPOCH}
            | ({"workstation": sha256_file(workstation_layer.require_fresh(spec))} if workstation else {}),
            sort_keys=True,
        )
    )
    command = f"samebox render --image {spec.id}"
    if spec.has_torch and not flash_attn:
        command += " --no-flash-attn"
    elif flash_attn_enabled and flash_attn_profile != "full":
        command += f" --flash-attn-profile {flash_attn_profile}"
    if workstation:
        command += " --with workstation"
    return _template_env().get_template("Dockerfile.j2").render(
        spec=spec,
        base_ref=spec.base_ref,
        command=command,
        inputs_sha256=inputs,
        lock_sha256=lock,
        source_date_epoch=SOURCE_DATE_EPOCH,
        lock_name=f"{spec.id}.lock.txt",
        conda_mirror=MINICONDA_BASE_URL,
        flash_attn_enabled=flash_attn_enabled,
        flash_attn_profile=flash_attn_profile,
        build_tools=compat.FLASH_ATTN_BUILD_TOOLS,
        labels=image_labels(spec, lock, flash_attn_enabled, flash_attn_profile)
        | ({"io.samebox.workstation": "jupyterlab + tensorboard"} if workstation else {}),
        workstation=workstation,
        workstation_lock_name=f"{spec.id}.workstation.lock.txt",
        workstation_entrypoint=workstation_layer.ENTRYPOINT,
        workstation_ports=sorted(workstation_layer.PORTS.values()),
    )


GENERATED_MARKER = "# AUTO GENERATED by `samebox render"


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or a context samebox wrote (its Dockerfile carries the marker) is replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SameboxError(f"{out_dir} exists and is not a directory", "give --output a new or empty directory")
    dockerfile = out_dir / "Dockerfile"
    ours = dockerfile.is_file() and dockerfile.read_text(errors="replace").startswith(GENERATED_MARKER)
    if any(out_dir.iterdir()) and not ours:
        raise SameboxError(
            f"{out_dir} is not empty and is not a build context samebox wrote; refusing to replace it",
            "give --output a new or empty directory (the default is build/<id>)",
        )


def write_context(spec: ImageSpec, out_dir: Path, flash_attn: bool = True,
                  flash_attn_profile: str = compat.DEFAULT_FLASH_ATTN_PROFILE,
                  workstation: bool = False) -> Path:
    """Write a self-contained build context (Dockerfile, lockfile, src/) to out_dir, replacing it whole.

    The context is assembled in a sibling temp dir and renamed into place, so a half-written one never exists.
    """
    dockerfile = render_dockerfile(spec, flash_attn, flash_attn_profile, workstation)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise SameboxError(f"cannot write the build context to {out_dir}: {e.strerror or e}",
                           "give --output a directory path in a writable place (not under a file)") from None
    try:
        write_atomic(tmp / "Dockerfile", dockerfile)
        shutil.copyfile(spec.lockfile, tmp / f"{spec.id}.lock.txt")
        if workstation:
            shutil.copyfile(workstation_layer.lockfile(spec), tmp / f"{spec.id}.workstation.lock.txt")
        src = tmp / "src"
        src.mkdir()
        root = project_root()
        for item in SOURCE_ITEMS:
            path = root / item
            if path.is_dir():
                shutil.copytree(path, src / item, ignore=_IGNORED)
            elif path.is_file():
                shutil.copyfile(path, src / item)
        # The lockfile of this image travels with the source, so `samebox verify` inside the image finds it.
        (src / "lockfiles").mkdir()
        shutil.copyfile(spec.lockfile, src / "lockfiles" / spec.lockfile.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def render_bake(catalog: list[ImageSpec], build_dir: str = "build") -> str:
    """A `docker buildx bake` file (JSON form) with one target per catalog image whose lockfile exists."""
    targets = {}
    for spec in sorted(catalog, key=lambda s: s.id):
        if not spec.lockfile.is_file():
            continue
        name = spec.id.replace(".", "_")
        targets[name] = {
            "context": f"{build_dir}/{spec.id}",
            "dockerfile": "Dockerfile",
            "tags": [default_tag(spec)],
        }
    bake = {
        "//": "AUTO GENERATED by `samebox render --all` — DO NOT MANUALLY MODIFY. "
              "Render every context first (samebox render --all), then `docker buildx bake -f build/docker-bake.json` "
              "(add --set '*.secret=id=ca_bundle,src=CA.pem' behind a TLS proxy).",
        "group": {"default": {"targets": sorted(targets)}},
        "target": targets,
    }
    return json.dumps(bake, indent=2, sort_keys=True) + "\n"
