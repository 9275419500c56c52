"""`samebox verify [--image ID]`: the live environment against its lockfile; `samebox verify --built-image REF`: a
local image built by `samebox image` against its catalog entry's lock. Exit 1 when they differ."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.catalog import Catalog
from builder.core.environment import Environment
from builder.core.errors import SameboxError
from builder.core.output import print_json
from builder.image.built import check_built_image
from builder.image.engine import ENGINES, detect_engine
from builder.instance import drift


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the live environment against the lockfile")
    p.add_argument("--image", help="catalog image (default: $SAMEBOX_IMAGE, else the one this platform fits)")
    p.add_argument("--lockfile", type=Path, help="a lockfile other than the image's")
    p.add_argument("--no-files", action="store_true", help="skip hashing installed files against their RECORD")
    p.add_argument("--rehash", action="store_true", help="hash every installed file again (by default a package "
                   "whose files have the size and mtime they had when last hashed keeps that finding)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--built-image", metavar="REF", help="check a local image built by `samebox image` instead: its "
                   "labels name the catalog entry and the lock's sha256, and what is installed in it must match it")
    p.add_argument("--engine", default="docker", choices=[n for n, k in ENGINES.items() if k.drivers],
                   help="the engine holding --built-image (default: docker)")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.built_image:
        return _run_built(args)
    catalog = Catalog.load_for_claim(Path(args.root) if args.root else None, args.lockfile, args.image or "")
    # A lock named, or recorded by setup, needs no torch (its import takes seconds); only the comparison with the
    # nearest catalog image asks this interpreter's torch.
    env = Environment.probe(gpus=False, torch=False)
    claim = catalog.claimed_lockfile(env, args.lockfile, args.image or "")
    if not claim.claimed:
        env = Environment.probe(gpus=False)
        claim = catalog.claimed_lockfile(env, args.lockfile, args.image or "")
    if claim.path is None:
        try:
            catalog.match(env)  # says which base image to rent
        except SameboxError as e:
            raise SameboxError(e.message, "or name the image: samebox verify --image ID") from e
        raise SameboxError(claim.how, "name the image: samebox verify --image ID")
    spec = claim.image
    if not claim.path.is_file():
        hint = f"make it with `make lock IMAGE={spec.id}`" if spec else "pass an existing lockfile to --lockfile"
        raise SameboxError(f"no lockfile {claim.path}", hint)
    problems = drift.verify_lock(claim.path, torch=spec.torch_full if spec else "", check_files=not args.no_files,
                                rehash=args.rehash)
    name = spec.id if spec else "this environment"
    if args.json:
        print_json({"image": spec.id if spec else None, "lockfile": str(claim.path), "ok": not problems,
                    "problems": problems})
    else:
        print("\n".join(f"- {p}" for p in problems) or f"{name}: the environment matches {claim.path}")
    return 1 if problems else 0


def _run_built(args: argparse.Namespace) -> int:
    if args.image or args.lockfile:
        raise SameboxError("--built-image takes its catalog entry and lock from the image's labels",
                           "leave out --image and --lockfile")
    catalog = Catalog.load(Path(args.root) if args.root else None)
    check = check_built_image(detect_engine(args.engine), args.built_image, catalog.find, not args.no_files)
    if args.json:
        print_json(check.to_dict())
    else:
        print("\n".join(f"- {p}" for p in check.problems)
              or f"{check.ref} ({check.image_id}): built from {check.spec.lockfile} as it is now, and what is "
                 f"installed in it matches it")
        print(f"reproducible: {check.reproducible or 'not labelled (built before samebox labelled it)'}")
    return 1 if check.problems else 0
