"""`samebox render`: write the build context (Dockerfile, lockfile, source) for one image, or all plus a bake file;
the lockfiles pass `samebox lock --check` first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._selection import add_flash_attn_arguments, add_layer_arguments, add_selection_arguments, select_image
from builder.core.fsutil import write_atomic
from builder.core.output import print_json
from builder.core.spec import load_catalog
from builder.image import lock
from builder.image.render import render_bake, render_dockerfile, write_context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render Dockerfile + build context (dry run: nothing is built)")
    add_selection_arguments(p)
    p.add_argument("--all", action="store_true", help="every locked catalog image, plus build/docker-bake.json")
    p.add_argument("--output", default="build", help="directory for contexts (default: build/)")
    add_flash_attn_arguments(p)
    add_layer_arguments(p)
    p.add_argument("--print", dest="print_only", action="store_true", help="print the Dockerfile, write nothing")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.add_argument("--allow-stale", action="store_true", help="render from lockfiles `samebox lock --check` finds "
                   "stale (a warning instead of exit 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.all:
        specs = [s for s in load_catalog(Path(args.root) if args.root else None) if s.lockfile.is_file()]
    else:
        specs = [select_image(args)]
    for warning in lock.require_fresh_locks(specs, args.allow_stale):
        print(f"samebox: warning: {warning}", file=sys.stderr)
    layers = (not args.no_flash_attn, args.flash_attn_profile, "workstation" in args.layers)
    if args.print_only and not args.all:
        print(render_dockerfile(specs[0], *layers), end="")
        return 0
    written = {s.id: str(write_context(s, out / s.id, *layers)) for s in specs}
    if args.all:
        write_atomic(out / "docker-bake.json", render_bake(specs, str(out)))
        written["bake"] = str(out / "docker-bake.json")
    if args.json:
        print_json(written)
    else:
        for name, path in written.items():
            print(f"{name}: {path}")
    return 0
