"""`samebox render`: write the build context (Dockerfile, lockfile, source) for one image, or all plus a bake file."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.fsutil import write_atomic
from builder.output import print_json
from builder.render import render_bake, render_dockerfile, write_context
from builder.selection import add_flash_attn_arguments, add_layer_arguments, add_selection_arguments, select_image
from builder.spec import load_catalog


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render Dockerfile + build context (dry run: nothing is built)")
    add_selection_arguments(p)
    p.add_argument("--all", action="store_true", help="every locked catalog image, plus build/docker-bake.json")
    p.add_argument("--output", default="build", help="directory for contexts (default: build/)")
    add_flash_attn_arguments(p)
    add_layer_arguments(p)
    p.add_argument("--print", dest="print_only", action="store_true", help="print the Dockerfile, write nothing")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.all:
        catalog = [s for s in load_catalog(Path(args.root) if args.root else None) if s.lockfile.is_file()]
        written = {s.id: str(write_context(s, out / s.id, not args.no_flash_attn, args.flash_attn_profile,
                                           "workstation" in args.layers)) for s in catalog}
        write_atomic(out / "docker-bake.json", render_bake(catalog, str(out)))
        written["bake"] = str(out / "docker-bake.json")
    else:
        spec = select_image(args)
        if args.print_only:
            workstation = "workstation" in args.layers
            print(render_dockerfile(spec, not args.no_flash_attn, args.flash_attn_profile, workstation), end="")
            return 0
        written = {spec.id: str(write_context(spec, out / spec.id, not args.no_flash_attn, args.flash_attn_profile,
                                              "workstation" in args.layers))}
    if args.json:
        print_json(written)
    else:
        for name, path in written.items():
            print(f"{name}: {path}")
    return 0
