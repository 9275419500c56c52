"""`samebox fingerprint`: what this Python environment holds and what this machine is, as deterministic JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.core.fsutil import write_atomic
from builder.instance import fingerprint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fingerprint", help="fingerprint this environment (packages, torch, CUDA, GPU)")
    p.add_argument("-o", "--output", type=Path, help="write the JSON to FILE (atomically)")
    p.add_argument("--json", action="store_true", help="print the JSON")
    p.add_argument("--no-files", action="store_true", help="skip hashing installed files against their RECORD")
    p.add_argument("--rehash", action="store_true", help="hash every installed file again (by default a package "
                   "whose files have the size and mtime they had when last hashed keeps that finding)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fp = fingerprint.collect(with_files=not args.no_files, cache=fingerprint.default_checks_path(),
                             refresh=args.rehash)
    text = fingerprint.dumps(fp)
    if args.output:
        write_atomic(args.output, text)
    if args.json:
        print(text, end="")
    elif not args.output:
        torch = (fp["torch"] or {}).get("version", "none")
        gpus = ", ".join(g["name"] for g in fp["machine"]["gpus"]) or "no GPU"
        modified = sorted(n for n, p in fp["packages"].items() if p.get("modified"))
        print(f"Python {fp['python']['version']} ({fp['python']['executable']}), torch {torch}, {gpus}")
        print(f"{len(fp['packages'])} distributions; modified files in: {', '.join(modified) or 'none'}")
    return 0
