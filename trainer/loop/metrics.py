"""Seeing a run: a progress line, metrics.jsonl, TensorBoard (AutoDL serves /root/tf-logs) and optional wandb.

A run continues its record from the step it starts at: rows a killed run wrote after its last checkpoint are
dropped from metrics.jsonl, and TensorBoard hides its events from that step on, so no step is there twice.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from builder.core.fsutil import write_atomic
from builder.core.progress import format_duration
from trainer.config import OutputConfig

AUTODL_TF_LOGS = Path("/root/tf-logs")


def tensorboard_dir(cfg: OutputConfig, run_dir: Path) -> Path | None:
    if cfg.tensorboard == "false":
        return None
    if cfg.tensorboard == "auto" and importlib.util.find_spec("tensorboard") is None:
        return None
    if cfg.tensorboard_dir:
        return Path(cfg.tensorboard_dir).expanduser()
    if AUTODL_TF_LOGS.is_dir():
        return AUTODL_TF_LOGS / run_dir.name
    return run_dir / "tensorboard"


def truncate_metrics(path: Path, start_step: int) -> int:
    """Keep the rows of steps up to ``start_step`` (the checkpoint a run resumes from; 0: none); a line cut by a
    kill is dropped too. Returns how many rows were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def progress_line(row: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {row['step']}/{total_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"{row['tokens_per_s']:,.0f} tok/s", f"{row['label_tokens_per_s']:,.0f} label tok/s"]
    if row.get("mem_gib") is not None:
        parts.append(f"mem {row['mem_gib']:.1f} GiB")
    if row.get("eta_s") is not None:
        parts.append(f"eta {format_duration(row['eta_s'])}")
    if row.get("skipped"):
        parts.append(f"SKIPPED ({row['skipped']})")
    return " | ".join(parts)


class MetricsLogger:
    """Writes every step to metrics.jsonl; prints and forwards every ``log_every`` steps (rank 0 only)."""

    def __init__(self, cfg: OutputConfig, run_dir: Path, total_steps: int, config: dict[str, Any],
                 enabled: bool = True, start_step: int = 0) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = cfg.log_every_steps
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(self.path, start_step)
        if dropped:
            self.event(f"metrics.jsonl continues from step {start_step}: {dropped} later row(s) of the interrupted "
                       "run dropped")
        tb_dir = tensorboard_dir(cfg, run_dir)
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides this directory's earlier events from the first step logged now on.
            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1)
            print(f"samebox: TensorBoard logs in {tb_dir}", flush=True)
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_dir.name, config=config, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        step = row["step"]
        if step % self.log_every == 0 or step == self.total_steps or row.get("skipped"):
            print(progress_line(row, self.total_steps), file=sys.stdout, flush=True)
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if self.tb is not None:
                for key, value in scalars.items():
                    self.tb.add_scalar(f"train/{key}", value, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step=step)

    def event(self, message: str) -> None:
        if self.enabled:
            print(f"samebox: {message}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
