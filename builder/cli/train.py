"""`samebox train CONFIG.yaml [--resume auto|PATH [--resume-changed-data] | --overwrite] [--no-preflight] [--json]
[key=value ...]`: LoRA/QLoRA fine-tuning.

Before anything slow, in this order: the config (every field), output.dir (created, writable, not in use by another
run, no earlier run's checkpoints unless resuming or --overwrite; when resuming, a checkpoint that passes its checks,
of the same data file), the data (file, rows, tokenizer) and the resumed checkpoint's data order, then the GPU
self-test, then the weights; a run that stops in these checks leaves no directory it made. Under several GPUs the
launcher runs it once per GPU: `torchrun --nproc_per_node 2 -m builder train ...` (or `accelerate launch -m builder
train ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from builder.core import supported
from builder.core.fsutil import pruned_if_left_empty
from builder.core.output import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA/QLoRA from a YAML config (see configs/)")
    p.add_argument("config", help="YAML config, e.g. configs/qwen2.5-7b-qlora-24gb.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in output.dir (auto) or from PATH")
    p.add_argument("--resume-changed-data", action="store_true",
                   help="resume although the data file changed since the checkpoint (the steps left use the new data)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir that holds an earlier run (its checkpoints are deleted)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip `samebox selftest --quick` before training (needed on a machine without a GPU)")
    p.add_argument("--json", action="store_true",
                   help="print how the run ended (status, steps, adapter, summary) as one JSON object on stdout; "
                        "progress and messages go to stderr")
    p.set_defaults(func=run)
    plain = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        # argparse ends the positionals at the first flag: `train C --resume auto lr=1` would leave lr=1 unparsed.
        ns, extra = plain(args, namespace)
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        ns.overrides = list(ns.overrides or []) + late
        return ns, [a for a in extra if a not in late]

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    if not args.json:
        return train(args, {})
    outcome: dict = {}
    with contextlib.redirect_stdout(sys.stderr):  # every line for people; stdout keeps the one JSON object
        code = train(args, outcome)
    if outcome:
        print_json(outcome)
    return code


def train(args: argparse.Namespace, outcome: dict) -> int:
    supported.require("train")  # a release outside the tested range: said now, not mid-run
    # The config is checked before torch and transformers are imported: a typo costs no wait.
    from trainer.config import load_config

    cfg = load_config(Path(args.config), args.overrides)
    from trainer.loop.startup import STARTUP
    from trainer.model.prefetch import start_prefetch

    STARTUP.reset()
    STARTUP.mark("command")
    # The native libraries and the weight files are read into memory beside the data checks, the imports and the
    # preflight (a cold disk).
    STARTUP.prefetch = start_prefetch(cfg.model)
    try:
        return _train(args, cfg, outcome)
    finally:
        if STARTUP.prefetch is not None:
            STARTUP.prefetch.stop()


def _train(args: argparse.Namespace, cfg: Any, outcome: dict) -> int:
    from trainer.data.dataset import cache_dir
    from trainer.loop import preflight, rundir
    from trainer.loop.distributed import ranks_from_env
    from trainer.loop.prepare import prepare_data
    from trainer.loop.recipe import main
    from trainer.loop.startup import STARTUP
    from trainer.model.load import import_libraries

    # A run that fails its checks leaves no empty output.dir or cache behind (a config's AutoDL paths on another
    # host); output.dir stays locked until the run returns: a second run there is refused.
    with pruned_if_left_empty(Path(cfg.output.dir)), pruned_if_left_empty(cache_dir(cfg.data)), \
            rundir.open_run(cfg, args.resume, args.overwrite, args.resume_changed_data, ranks_from_env()) as start:
        prepared = prepare_data(cfg)
        rundir.check_samples(start, len(prepared[0]))  # before the self-test, and before the weights
        STARTUP.mark("data")
        # The self-test uses the GPU while this process imports what the weights need (no CUDA context yet).
        with preflight.Pending(None, 0) if args.no_preflight else preflight.start_preflight(cfg) as pending:
            import_libraries(cfg.model)
            STARTUP.mark("imports")
            try:
                pending.wait()
            except preflight.PreflightFailed as e:
                print(f"samebox train: {e}", file=sys.stderr)
                outcome.update(status="preflight failed", problems=e.problems)
                return 1
        if not args.no_preflight:
            STARTUP.mark("preflight")
        return main(cfg, resume=args.resume, overwrite=args.overwrite, prepared=prepared,
                    resume_changed_data=args.resume_changed_data, start=start, outcome=outcome)
