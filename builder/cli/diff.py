"""`samebox diff A B`: drift between two fingerprints, grouped; exit 1 on drift, 0 otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.core.output import print_json
from builder.instance import drift, fingerprint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare two fingerprints (exit 1 on drift; GPU/driver are not drift)")
    p.add_argument("a", type=Path, help="fingerprint JSON (the reference)")
    p.add_argument("b", type=Path, help="fingerprint JSON (the one checked)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = drift.diff_fingerprints(fingerprint.load(args.a), fingerprint.load(args.b))
    if args.json:
        print_json(report)
    else:
        print(drift.format_diff(report))
    return 1 if report["drift"] else 0
