"""`samebox setup-script [--image ID] -o FILE`: render setup.sh (the checkout's, or a standalone one for an image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.fsutil import write_atomic
from builder.core.spec import find_image, load_catalog
from builder.image.setup_script import render_setup_script


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("setup-script", help="render setup.sh for instances that cannot run Docker")
    p.add_argument("--image", help="embed this image's entry and lockfile (default: the checkout's setup.sh)")
    p.add_argument("-o", "--output", type=Path, help="write to FILE (default: stdout)")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = None
    command = "samebox setup-script -o setup.sh"
    if args.image:
        root = Path(args.root) if args.root else None
        spec = find_image(args.image, load_catalog(root))
        command = f"samebox setup-script --image {args.image}" + (" --root ROOT" if root else "") + " -o FILE"
    text = render_setup_script(spec, command)
    if args.output:
        write_atomic(args.output, text, mode=0o755)
    else:
        print(text, end="")
    return 0
