"""`samebox verify [--image ID]`: the live environment against its lockfile; exit 1 when they differ."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from builder import drift, platform
from builder.errors import SameboxError
from builder.output import add_root_argument, print_json
from builder.spec import find_image, load_catalog


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the live environment against the lockfile")
    p.add_argument("--image", help="catalog image (default: $SAMEBOX_IMAGE, else the one this platform fits)")
    p.add_argument("--lockfile", type=Path, help="a lockfile other than the image's")
    p.add_argument("--no-files", action="store_true", help="skip hashing installed files against their RECORD")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(Path(args.root) if args.root else None)
    image = args.image or os.environ.get("SAMEBOX_IMAGE", "")
    if image:
        spec = find_image(image, catalog)
    else:
        try:
            entry = platform.match_entry(platform.detect(), [s.to_dict() for s in catalog])
        except platform.PlatformMismatch as e:
            raise SameboxError(str(e), "or name the image: samebox verify --image ID") from e
        spec = find_image(entry["id"], catalog)
    lockfile = args.lockfile or spec.lockfile
    if not lockfile.is_file():
        raise SameboxError(f"no lockfile {lockfile}", f"make it with `make lock IMAGE={spec.id}`")
    problems = drift.verify_lock(lockfile, torch=spec.torch_full, check_files=not args.no_files)
    if args.json:
        print_json({"image": spec.id, "lockfile": str(lockfile), "ok": not problems, "problems": problems})
    else:
        print("\n".join(f"- {p}" for p in problems) or f"{spec.id}: the environment matches {lockfile}")
    return 1 if problems else 0
