"""`samebox wheel flash-attn`: the flash-attn wheel for a catalog image or the live environment, from the cache,
the official release, or a source build (builder/wheels/resolve.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core import compat
from builder.core.catalog import Catalog
from builder.core.environment import Environment
from builder.core.output import format_fields, print_json
from builder.core.settings import AUTODL_SHARED_FS
from builder.wheels import key as wkey
from builder.wheels import resolve
from builder.wheels.cache import WheelCache, default_cache_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wheel", help="get the flash-attn wheel for an image or this environment")
    p.add_argument("package", choices=["flash-attn"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="ID", help="catalog image to get the wheel for")
    src.add_argument("--from-env", action="store_true", help="this Python's torch, CUDA, ABI and GPUs")
    p.add_argument("--arch", action="append", metavar="CC", help="GPU compute capability, repeatable (9.0)")
    p.add_argument("--profile", choices=wkey.PROFILES, default=wkey.DEFAULT_PROFILE,
                   help=compat.FLASH_ATTN_PROFILE_HELP)
    p.add_argument("--version", dest="fa_version", metavar="V", help="flash-attn version (default: the image's)")
    p.add_argument("--cache", metavar="DIR", help="wheel cache (default: $SAMEBOX_WHEEL_CACHE, AutoDL's "
                   f"{AUTODL_SHARED_FS}/samebox/wheels, else ~/.cache/samebox/wheels)")
    p.add_argument("--dest", metavar="DIR", help="copy the resolved wheel into DIR")
    p.add_argument("--sdist", metavar="PATH", help="flash-attn sdist to build from (sha256-checked)")
    p.add_argument("--install", action="store_true", help="pip-install it here after checking the GPUs")
    p.add_argument("--offline", action="store_true", help="no downloads: cache, else build from --sdist")
    p.add_argument("--dry-run", action="store_true", help="print what would be tried; do nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    catalog = Catalog.load(Path(args.root) if args.root else None)
    here = Environment.probe() if (args.from_env or args.install or not args.dry_run) else None
    if args.image:
        key = wkey.key_from_spec(catalog.find(args.image), args.arch, args.profile, args.fa_version)
    else:
        key = wkey.key_from_env(here, args.arch, args.profile, args.fa_version, catalog)
    notes = wkey.arch_notes(args.arch or [])
    cache = WheelCache(Path(args.cache) if args.cache else default_cache_dir())
    if args.dry_run:
        plan = {"arch_notes": notes, **resolve.dry_run(key, cache, args.offline)}
        if args.json:
            print_json(plan)
        else:
            print(format_fields(plan))
        return 0

    def say(msg: str) -> None:
        print(f"samebox wheel: {msg}", file=sys.stderr, flush=True)

    for note in notes:
        say(note)

    result = resolve.resolve_wheel(key, cache, here, args.offline, Path(args.sdist) if args.sdist else None,
                                   say)
    if args.install:
        result.steps += resolve.install(result.entry, key, here)
        say(result.steps[-1])
    out = result.to_dict()
    if args.dest:
        out["dest"] = str(resolve.copy_to(result.entry, Path(args.dest)))
        say(f"copied to {out['dest']}")
    if args.json:
        print_json(out)
    else:
        print(out.get("dest", out["wheel"]))
    return 0
