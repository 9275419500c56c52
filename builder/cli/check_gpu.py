"""`samebox check-gpu --gpu NAME [--driver VER]`: which catalog images run on that GPU, why not, and the best one."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core.catalog import Catalog, check_gpu
from builder.core.environment import Capability
from builder.core.output import format_table, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-gpu", help="before cloning: does each image run on this GPU and driver?")
    p.add_argument("--gpu", required=True, help="GPU name as the platform shows it: 'RTX 4090', 'H20', 'vGPU-32GB'")
    p.add_argument("--driver", default="", help="driver version, e.g. 550.54.14 (nvidia-smi)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = check_gpu(args.gpu, Catalog.load(Path(args.root) if args.root else None), args.driver)
    if args.json:
        print_json(report)
        return 0
    print(f"{report['gpu']} ({Capability.parse(report['compute_capability']).sm})"
          + (f", driver {report['driver']}" if report["driver"] else ", driver not given (not checked)"))
    rows = [(v["image"], v["torch"], v["verdict"], "yes" if v["rent"] else "no", "; ".join(v["reasons"]) or "-")
            for v in report["images"]]
    print(format_table(("image", "torch", "verdict", "rentable", "why"), rows))
    print(f"best image: {report['best']} (rent the base image: {report['rent']})" if report["best"]
          else "best image: none of the catalog's rentable images runs on this GPU")
    return 0
