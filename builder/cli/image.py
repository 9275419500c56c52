"""`samebox image`: resolve -> lock check -> render the context -> build it with a container engine (or just print,
--engine none)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._selection import add_flash_attn_arguments, add_layer_arguments, add_selection_arguments, select_image
from builder.image import lock
from builder.image.engine import ENGINES, BuildRequest, ca_bundle_path, detect_engine, printed_command, run_build
from builder.image.render import default_tag, write_context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="build the image for a catalog entry")
    add_selection_arguments(p)
    p.add_argument("--engine", default="docker", choices=list(ENGINES),
                   help="container engine (none: write context only)")
    p.add_argument("--tag", help="image tag (default: samebox:<id>-<lock hash>)")
    p.add_argument("--push", action="store_true", help="push the tag after a successful build")
    p.add_argument("--allow-stale", action="store_true", help="build from a lockfile `samebox lock --check` finds "
                   "stale (a warning instead of exit 2)")
    p.add_argument("--base-image", help="build on this base instead of the catalog's (e.g. a local mirror)")
    p.add_argument("--output", help="where to write the build context (default: build/<id>)")
    add_flash_attn_arguments(p)
    add_layer_arguments(p)
    p.add_argument("--conda-mirror", help="Miniconda mirror URL (the installer's sha256 is still checked)")
    p.add_argument("--ca-bundle", help="proxy CA bundle to pass as a build secret (default: $PIP_CERT/$SSL_CERT_FILE)")
    p.add_argument("--no-host-network", action="store_true", help="do not pass --network host to the build")
    p.add_argument("--no-cache", action="store_true", help="rebuild every layer (cache mounts are kept)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = select_image(args)
    for warning in lock.require_fresh_locks([spec], args.allow_stale):
        print(f"samebox: warning: {warning}", file=sys.stderr)
    engine = detect_engine(args.engine)
    ca_bundle = ca_bundle_path(args.ca_bundle)  # a missing --ca-bundle file is an error before anything is written
    context = write_context(spec, Path(args.output or f"build/{spec.id}"), not args.no_flash_attn,
                            args.flash_attn_profile, "workstation" in args.layers)
    build_args = {"CONDA_MIRROR": args.conda_mirror} if args.conda_mirror else {}
    req = BuildRequest(context=context, tag=args.tag or default_tag(spec), base_image=args.base_image,
                       network_host=not args.no_host_network, push=args.push, build_args=build_args,
                       no_cache=args.no_cache)
    print(f"samebox: image {spec.id} (torch {spec.torch_full}, CUDA {spec.cuda}, Python {spec.python}) -> {req.tag}")
    if engine.name == "none":
        print(f"samebox: context written to {context}; build it with:\n  {printed_command(req, ca_bundle)}")
        return 0
    log = context.parent / f"{spec.id}.build.log"
    rc = run_build(engine, req, log, ca_bundle)
    if rc != 0:
        print(f"samebox: error: the {engine.name} build failed (exit {rc}); no tag was created; "
              f"full log kept at {log}", file=sys.stderr)
        return 1
    print(f"samebox: built {req.tag} (log: {log})")
    return 0
