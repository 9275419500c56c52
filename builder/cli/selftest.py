"""`samebox selftest`: GPU health, numerics, the job's kernels and the environment, before a long job."""

from __future__ import annotations

import argparse

from builder.core.output import print_json
from builder.selftest import run_selftest
from builder.selftest.probes import KERNELS


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
    p.set_defaults(func=run, mode="quick")


def run(args: argparse.Namespace) -> int:
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    _register_trainer_checks()
    report = run_selftest(args.mode, args.model, args.data_dir, args.lockfile, kernels)
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
