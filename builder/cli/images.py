"""`samebox images`: the catalog as a table, or JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.output import format_table, print_json
from builder.core.spec import load_catalog


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="list the catalog of images")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(Path(args.root) if args.root else None)
    if args.json:
        print_json([s.to_dict() for s in catalog])
        return 0
    # platforms last: the base images an instance is rented with (the setup script's starting points), often long.
    rows = [
        (s.id, s.torch_full, s.cuda, s.cudnn, s.python, s.os, s.python_provider, " ".join(s.archs), s.flash_attn,
         "yes" if s.lockfile.is_file() else "no", "; ".join(s.platforms) or "-")
        for s in catalog
    ]
    print(format_table(("id", "torch", "cuda", "cudnn", "python", "os", "provider", "archs", "flash-attn", "locked",
                        "platforms"), rows))
    return 0
