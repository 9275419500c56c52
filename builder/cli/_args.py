"""Arguments more than one subcommand takes."""

from __future__ import annotations

import argparse


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    """--root: a catalog root other than this checkout (holds images/ and lockfiles/)."""
    parser.add_argument("--root", default=None, help="catalog root holding images/ and lockfiles/ (default: checkout)")
