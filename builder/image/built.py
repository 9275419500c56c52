"""A local image against its catalog entry's lock: the labels `samebox image` wrote (which entry, which lock, how
reproducible), then `samebox verify` run inside the image against this checkout's lockfile, mounted read-only."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from builder.core.errors import SameboxError
from builder.core.spec import ImageSpec
from builder.image.engine import Engine
from builder.image.lock import lockfile_sha256
from builder.image.reproducible import REPRODUCIBLE_LABEL

IMAGE_ID_LABEL = "io.samebox.image-id"
LOCK_LABEL = "io.samebox.lock-sha256"
# Where the lockfile is mounted in the container that runs `samebox verify`.
MOUNTED_LOCK = "/run/samebox-verify/lock.txt"


@dataclass(frozen=True)
class BuiltImageCheck:
    ref: str
    image_id: str  # the engine's id of the image
    spec: ImageSpec
    reproducible: str  # the image's io.samebox.reproducible label ("" when it predates it)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ref": self.ref, "id": self.image_id, "image": self.spec.id, "lockfile": str(self.spec.lockfile),
                "reproducible": self.reproducible, "ok": not self.problems, "problems": self.problems}


def check_built_image(engine: Engine, ref: str, find: Callable[[str], ImageSpec], check_files: bool = True
                      ) -> BuiltImageCheck:
    """Which catalog entry ``ref`` says it is (``find`` looks it up), whether it was built from that entry's lock
    as it is now, and whether what is installed in it matches that lock."""
    info = engine.image(ref)
    if info is None:
        raise SameboxError(f"{engine.name} has no local image {ref}", f"build it (samebox image) or name one "
                           f"`{engine.name} images` lists; --engine picks docker, podman or buildah")
    image_id = info.labels.get(IMAGE_ID_LABEL)
    if not image_id:
        raise SameboxError(f"{ref} has no {IMAGE_ID_LABEL} label: `samebox image` did not build it",
                           "check an image built by `samebox image`")
    spec = find(image_id)
    problems = []
    expected, built = lockfile_sha256(spec), info.labels.get(LOCK_LABEL, "")
    if built != expected:
        problems.append(f"{ref} was built from a lock with sha256 {built or '(no label)'}, but {spec.lockfile} now has "
                        f"sha256 {expected}: rebuild it with `samebox image --image {spec.id}`")
    problems += _installed_problems(engine, ref, spec, check_files)
    return BuiltImageCheck(ref, info.id, spec, info.labels.get(REPRODUCIBLE_LABEL, ""), problems)


def _installed_problems(engine: Engine, ref: str, spec: ImageSpec, check_files: bool) -> list[str]:
    """`samebox verify --lockfile` inside the image, against this checkout's lockfile: the image's own samebox
    compares what is installed there (versions and, unless ``check_files`` is off, every file against its RECORD)."""
    argv = ["samebox", "verify", "--lockfile", MOUNTED_LOCK, "--json", *([] if check_files else ["--no-files"])]
    out = engine.run_in(ref, argv, {spec.lockfile.resolve(): MOUNTED_LOCK})
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        tail = (out.stderr or out.stdout).strip()[-600:]
        return [f"could not run `samebox verify` inside {ref} (exit {out.returncode}): {tail}"]
    return [f"inside {ref}: {p}" for p in report.get("problems", [])]
