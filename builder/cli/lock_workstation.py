"""`samebox lock-workstation [--image ID | --all] [--check]`: lock the workstation layer (images/workstation.in:
JupyterLab) of catalog images into lockfiles/<id>.workstation.txt, the image's own lock as a constraint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.output import format_table
from builder.core.spec import find_image, load_catalog
from builder.image import workstation


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lock-workstation",
                       help="lock JupyterLab for `samebox image --with workstation` (lockfiles/<id>.workstation.txt)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--image", metavar="ID", help="one catalog image (see `samebox images`)")
    which.add_argument("--all", action="store_true", help="every catalog image that has a lock (the default)")
    p.add_argument("--check", action="store_true", help="exit 1 if a workstation lock is stale or missing")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(Path(args.root) if args.root else None)
    specs = [find_image(args.image, catalog)] if args.image else [s for s in catalog if s.lockfile.is_file()]
    if args.check:
        statuses = [workstation.check_workstation_lock(s) for s in specs]
        print(format_table(["id", "state", "reason"], [[st.id, st.state, st.reason] for st in statuses]))
        return 1 if any(st.state != "fresh" for st in statuses) else 0
    rows = []
    for spec in specs:
        print(f"locking the workstation layer of {spec.id} ...", file=sys.stderr)
        rows.append([spec.id, workstation.lock_workstation(spec), str(workstation.lockfile(spec))])
    print(format_table(["id", "packages", "lockfile"], rows))
    return 0
