"""`samebox lock`: write or check hashed lockfiles for catalog images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.lockfile import read_lock
from builder.core.output import format_table, print_json
from builder.core.settings import project_root
from builder.core.spec import ImageSpec, find_image, load_catalog
from builder.image import lock


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lock", help="resolve lockfiles/<id>.txt with uv, or check they are fresh")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--image", metavar="ID", help="one catalog image (see `samebox images`)")
    which.add_argument("--all", action="store_true", help="every catalog image (the default)")
    which.add_argument("--dev", action="store_true",
                       help="samebox's own dev lock (lockfiles/dev.txt, dev-builder.txt) from pyproject.toml")
    p.add_argument("--check", action="store_true", help="exit 1 if a lockfile is stale; no network")
    p.add_argument("--upgrade", action="store_true", help="re-resolve from scratch instead of keeping pins")
    p.add_argument("--find-links", metavar="DIR", default=None,
                   help="--dev: a directory holding the CPU torch wheel (default: its index, pyproject.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dev:
        return _dev(args)
    catalog = load_catalog(Path(args.root) if args.root else None)
    specs = [find_image(args.image, catalog)] if args.image else catalog
    if args.check:
        return _check(specs, args.json)
    results = []
    for spec in specs:
        print(f"locking {spec.id} ...", file=sys.stderr)
        results.append(lock.lock_image(spec, upgrade=args.upgrade))
        for name in results[-1].unchecked:
            print(f"  warning: no index served metadata for {name}; its torch bound is unchecked", file=sys.stderr)
    rows = [lock.lock_summary(s) for s in specs]
    if args.json:
        print_json(rows)
    else:
        print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    return 0


def _check(specs: list[ImageSpec], as_json: bool) -> int:
    statuses = [lock.check_lock(s) for s in specs]
    missing = [s for s, st in zip(specs, statuses, strict=True) if st.state == "missing"]
    if missing:
        raise lock.missing_locks_error(missing)
    rows = [{"state": st.state, **lock.lock_summary(s), "reason": st.reason} for s, st in zip(specs, statuses,
                                                                                             strict=True)]
    if as_json:
        print_json(rows)
    else:
        print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    stale = [s for s, st in zip(specs, statuses, strict=True) if st.state != "fresh"]
    for spec in stale:
        print(f"samebox: {spec.id}: regenerate with `{lock.lock_command(spec)}`", file=sys.stderr)
    return 1 if stale else 0


def _dev(args: argparse.Namespace) -> int:
    from builder.image import devlock

    root = Path(args.root).resolve() if args.root else project_root()
    if args.check:
        statuses = devlock.check_dev_lock(root)
        rows = [{"lock": str(st.path.relative_to(root)), "state": st.state, "reason": st.reason}
                for st in statuses]
        if args.json:
            print_json(rows)
        else:
            print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
        if any(st.state != "fresh" for st in statuses):
            print(f"samebox: regenerate with `{devlock.COMMAND}`", file=sys.stderr)
            return 1
        return 0
    from builder.core import supported

    print("locking samebox's dev environment ...", file=sys.stderr)
    written = devlock.lock_dev(root, find_links=args.find_links, upgrade=True)
    table = supported.write_table(root)
    rows = []
    for path in written:
        rel = str(path.relative_to(root))
        versions = read_lock(path)
        rows.append({"lock": rel, "packages": len(versions),
                     **{k: versions.get(k, "-") for k in devlock.KEY_PACKAGES}})
    if args.json:
        print_json({"locks": rows, "supported": str(table)})
    else:
        print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
        print(f"supported ranges: {table.relative_to(root)}")
    return 0
