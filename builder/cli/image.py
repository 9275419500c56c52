"""`samebox image`: resolve -> lock check -> render the context -> build it with a container engine (or just print,
--engine none); --verify-reproducible builds it twice from scratch and compares the two images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli._selection import add_flash_attn_arguments, add_layer_arguments, add_selection_arguments, select_image
from builder.core.errors import SameboxError
from builder.image import lock, reproducible
from builder.image.engine import (
    ENGINES,
    BuildRequest,
    Engine,
    Stamping,
    ca_bundle_path,
    detect_engine,
    printed_command,
    run_build,
)
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
    p.add_argument("--verify-reproducible", action="store_true", help="build twice without the layer cache (the "
                   "second as TAG-rebuild) and compare; on a difference, name the first differing layer and its files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = select_image(args)
    for warning in lock.require_fresh_locks([spec], args.allow_stale):
        print(f"samebox: warning: {warning}", file=sys.stderr)
    if args.verify_reproducible and (args.push or args.engine == "none"):
        raise SameboxError("--verify-reproducible builds locally and pushes nothing",
                           "leave out --push and --engine none; push the verified tag with a second `samebox image "
                           "--push` (its layers are cached)")
    engine = detect_engine(args.engine)
    stamping = engine.stamping(reproducible.SOURCE_DATE_EPOCH) if engine.driver else Stamping()
    if args.verify_reproducible and stamping.missing:
        raise SameboxError(f"{engine.name} ({engine.binary}) cannot build reproducibly: {stamping.missing}",
                           "use --engine buildah or --engine podman, or Docker with buildx and BuildKit >= 0.13")
    ca_bundle = ca_bundle_path(args.ca_bundle)  # a missing --ca-bundle file is an error before anything is written
    context = write_context(spec, Path(args.output or f"build/{spec.id}"), not args.no_flash_attn,
                            args.flash_attn_profile, "workstation" in args.layers)
    build_args = reproducible.build_args() | ({"CONDA_MIRROR": args.conda_mirror} if args.conda_mirror else {})
    req = BuildRequest(context=context, tag=args.tag or default_tag(spec), base_image=args.base_image,
                       network_host=not args.no_host_network, push=args.push, build_args=build_args,
                       no_cache=args.no_cache, labels=reproducible.labels(stamping) if engine.driver else {})
    print(f"samebox: image {spec.id} (torch {spec.torch_full}, CUDA {spec.cuda}, Python {spec.python}) -> {req.tag}")
    if engine.name == "none":
        print(f"samebox: context written to {context}; build it with:\n  {printed_command(req, ca_bundle)}")
        return 0
    if stamping.missing:
        print(f"samebox: warning: not reproducible: {stamping.missing}; for bit-for-bit builds use --engine buildah "
              "or podman, or Docker with buildx and BuildKit >= 0.13", file=sys.stderr)
    if not args.verify_reproducible:
        return 0 if _build(engine, req, context.parent / f"{spec.id}.build.log", ca_bundle, stamping) else 1
    first, second = reproducible.rebuild_request(req)
    for r, log in ((first, f"{spec.id}.build.log"), (second, f"{spec.id}.rebuild.log")):
        if not _build(engine, r, context.parent / log, ca_bundle, stamping):
            return 1
    comparison = reproducible.compare_images(engine, first.tag, second.tag, context.parent)
    print(f"samebox: {comparison.report()}")
    if comparison.same:
        engine.remove(second.tag)
        return 0
    print(f"samebox: both images are kept to inspect: {first.tag} {second.tag}")
    return 1


def _build(engine: Engine, req: BuildRequest, log: Path, ca_bundle: Path | None, stamping: Stamping) -> bool:
    rc = run_build(engine, req, log, ca_bundle, stamping)
    if rc != 0:
        print(f"samebox: error: the {engine.name} build failed (exit {rc}); no tag was created; "
              f"full log kept at {log}", file=sys.stderr)
        return False
    built = engine.image(req.tag)
    print(f"samebox: built {req.tag}" + (f", image id {built.id}" if built else "") + f" (log: {log})")
    return True
