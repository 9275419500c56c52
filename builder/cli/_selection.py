"""Shared command-line selection of one catalog image: --torch/--cuda/--python intent or --image ID."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.cli._args import add_root_argument
from builder.core import compat
from builder.core.errors import SameboxError
from builder.core.spec import ImageSpec, find_image, load_catalog, resolve_spec


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", help="torch version, e.g. 2.3 (resolved against the catalog)")
    p.add_argument("--cuda", help="CUDA version, e.g. 12.1 (optional)")
    p.add_argument("--python", help="Python version, e.g. 3.12 (optional)")
    p.add_argument("--image", help="catalog image id instead of --torch/--cuda/--python")
    add_root_argument(p)


def add_flash_attn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-flash-attn", action="store_true", help="leave the flash-attn wheel stage out")
    p.add_argument("--flash-attn-profile", choices=tuple(compat.FLASH_ATTN_PROFILES),
                   default=compat.DEFAULT_FLASH_ATTN_PROFILE,
                   help=compat.FLASH_ATTN_PROFILE_HELP)


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with", dest="layers", action="append", default=[], choices=("workstation",),
                   help="workstation: JupyterLab (8888, token from $JUPYTER_TOKEN) and TensorBoard (6007, "
                        "/root/tf-logs) started by the image's entrypoint; needs `samebox lock-workstation`")


def select_image(args: argparse.Namespace) -> ImageSpec:
    catalog = load_catalog(Path(args.root) if args.root else None)
    if args.image:
        if args.torch or args.cuda or args.python:
            raise SameboxError("--image cannot be combined with --torch/--cuda/--python", "give one or the other")
        return find_image(args.image, catalog)
    return resolve_spec(args.torch, args.cuda, args.python, catalog)
