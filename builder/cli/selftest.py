"""`samebox selftest`: GPU health, numerics, the job's kernels and the environment, before a long job."""

from __future__ import annotations

import argparse
import time

from builder.core.output import print_json
from builder.selftest import run_selftest
from builder.selftest.probes import KERNELS
from builder.selftest.runner import reused_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selftest", help="check the GPU, its kernels and the environment before a long job")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="identity, health, a 2 s load, the kernels, the environment: about 15 s on an H100 (default)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="adds a memory pattern test, repeatability, a 25 s load, the lockfile's file hashes and five LoRA "
        "steps: about 45 s",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report (schema: docs/selftest.md)")
    p.add_argument("--model", metavar="CONFIG_OR_DIR", help="test flash-attn for this model's attention")
    p.add_argument("--data-dir", metavar="PATH", help="check free space and a write+fsync where checkpoints go "
                   "(not made yet: judged on its nearest existing parent)")
    p.add_argument("--kernels", default=",".join(KERNELS), metavar="LIST",
                   help=f"the kernel libraries the job uses, comma-separated (default: {','.join(KERNELS)}); "
                   "the others are not imported or tested")
    p.add_argument(
        "--lockfile",
        metavar="PATH",
        help="compare installed packages with this lock "
        "(default: $SAMEBOX_LOCKFILE, else the catalog image matching this torch)",
    )
    p.add_argument("--reuse", nargs="?", const="kernels", choices=("kernels", "all"),
                   help="where a self-test passed on this boot with the same GPUs and environment: 'kernels' (the "
                   "default) takes its kernel checks and runs the rest (health, load, accuracy, disk); 'all' runs "
                   "nothing and says when it passed")
    p.set_defaults(func=run, mode="quick")


def run(args: argparse.Namespace) -> int:
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    # `--reuse all` stands for a quick run only (full's extra checks are never remembered), and not for a run that
    # names its own lockfile or data disk (those are checked now).
    if args.reuse == "all" and args.mode == "quick" and not args.data_dir and not args.lockfile:
        reused = reused_report(kernels, args.model)
        if reused is not None:
            if args.json:
                print_json(reused.to_dict())
            else:
                when = time.strftime("%H:%M:%S", time.localtime(reused.readings["reused"]["passed_at"] or 0))
                print(f"selftest quick passed on this boot at {when} with the same GPUs and environment: not run "
                      "again (`samebox selftest` runs it now)")
            return 0
    _register_trainer_checks()
    report = run_selftest(args.mode, args.model, args.data_dir, args.lockfile, kernels, reuse=args.reuse is not None)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format())
    return 1 if report.failed else 0


def _register_trainer_checks() -> None:
    """The trainer's fused layers bring their own check; where torch (and so the trainer) is missing, the probe
    says it was not registered."""
    try:
        from trainer.fused import selfcheck
    except ImportError:
        return
    from builder.selftest import kernel_probes

    kernel_probes.register_fused_layers(selfcheck.fused_layers)
