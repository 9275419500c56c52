"""The `samebox` command: parse arguments, hand over to one command module, turn user errors into exit code 2.

builder/cli/ holds the entry points only: each module here whose name does not start with '_' is one subcommand and
defines ``register(subparsers)``, which adds its subcommand and sets
``func(args) -> int`` on it. Commands stay thin: parse -> build the spec -> call the library.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import builder
from builder.core.errors import SameboxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samebox",
        description="One pinned GPU fine-tuning environment: image, setup script, fingerprint, self-test, trainer.",
    )
    parser.add_argument("--version", action="version", version=f"samebox {builder.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except SameboxError as e:
        print(f"samebox: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (head, less) went away: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("samebox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
