"""`samebox pin-bases`: fill base_digest in images/matrix.toml from the registry, where one is reachable."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.spec import catalog_path, find_image, load_catalog
from builder.image.pin import fetch_digest, set_base_digest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin-bases", help="pin each catalog base image by its registry digest")
    p.add_argument("--image", help="one catalog image id (default: all)")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else None
    catalog = load_catalog(root)
    specs = [find_image(args.image, catalog)] if args.image else catalog
    for spec in specs:
        digest = fetch_digest(spec.base_image)
        set_base_digest(catalog_path(root), spec.id, digest)
        print(f"{spec.id}: {spec.base_image} -> {digest}")
    return 0
