"""`samebox verify [--image ID]`: the live environment against its lockfile; exit 1 when they differ."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from builder import drift, platform
from builder.errors import SameboxError
from builder.output import add_root_argument, print_json
from builder.spec import ImageSpec, find_image, load_catalog


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the live environment against the lockfile")
    p.add_argument("--image", help="catalog image (default: $SAMEBOX_IMAGE, else the one this platform fits)")
    p.add_argument("--lockfile", type=Path, help="a lockfile other than the image's")
    p.add_argument("--no-files", action="store_true", help="skip hashing installed files against their RECORD")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def _image(args: argparse.Namespace) -> ImageSpec:
    catalog = load_catalog(Path(args.root) if args.root else None)
    image = args.image or os.environ.get("SAMEBOX_IMAGE", "")
    if image:
        return find_image(image, catalog)
    try:
        entry = platform.match_entry(platform.detect(), [s.to_dict() for s in catalog])
    except platform.PlatformMismatch as e:
        raise SameboxError(str(e), "or name the image: samebox verify --image ID") from e
    return find_image(entry["id"], catalog)


def run(args: argparse.Namespace) -> int:
    # The lock this environment claims: --lockfile, else the one setup.sh recorded ($SAMEBOX_LOCKFILE), else the
    # catalog image's. Only the catalog route knows the torch local tag to expect.
    env_lock = os.environ.get("SAMEBOX_LOCKFILE")
    lockfile = args.lockfile or (Path(env_lock) if env_lock and not args.image else None)
    spec = _image(args) if args.image or lockfile is None else None
    lockfile = lockfile or spec.lockfile
    if not lockfile.is_file():
        hint = f"make it with `make lock IMAGE={spec.id}`" if spec else "pass an existing lockfile to --lockfile"
        raise SameboxError(f"no lockfile {lockfile}", hint)
    problems = drift.verify_lock(lockfile, torch=spec.torch_full if spec else "", check_files=not args.no_files)
    name = spec.id if spec else "this environment"
    if args.json:
        print_json({"image": spec.id if spec else None, "lockfile": str(lockfile), "ok": not problems,
                    "problems": problems})
    else:
        print("\n".join(f"- {p}" for p in problems) or f"{name}: the environment matches {lockfile}")
    return 1 if problems else 0
