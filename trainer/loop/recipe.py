"""The LoRA/QLoRA fine-tuning recipe: setup -> train -> cleanup, with a short main.

Setup loads the model (``_setup_model``), the tokenized data (``_setup_data``), the optimizer and schedule
(``_setup_optimizer``), then restores a checkpoint when resuming. Train runs optimizer steps, each a fixed set of
samples, saving atomically every N steps / T minutes and when SIGTERM or SIGINT asks it to stop. Under torchrun /
accelerate launch each process takes a share of every step and rank 0 alone writes (trainer/loop/distributed.py); with
train.shard=fsdp the processes also share the model's weights (trainer/loop/sharding.py).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from builder.core.fsutil import readable_files, write_atomic
from trainer.config import TrainConfig
from trainer.data.batching import build_micro_batches, idle_micro_batch, step_indices, steps_per_epoch
from trainer.data.dataset import TokenizedData
from trainer.loop import checkpoint as ckpt
from trainer.loop import distributed as dist
from trainer.loop import rundir, sharding
from trainer.loop.memory import MemoryPhases
from trainer.loop.metrics import MetricsLogger
from trainer.loop.prepare import prepare_data
from trainer.loop.startup import STARTUP
from trainer.loop.step import StepLoss, clip_and_check, is_finite, run_step
from trainer.model.load import LoadedModel, decoder_and_head, micro_batch_budget, setup_model
from trainer.model.loss import loss_chunk_rows

RANK_TIMES = ("step_s", "compute_s", "reduce_s")  # each rank's, in every row under torchrun


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class LoRAFinetuneRecipe:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
                 prepared: tuple[TokenizedData, str] | None = None, resume_changed_data: bool = False,
                 start: rundir.RunStart | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.resume_changed_data = resume_changed_data
        self.prepared = prepared  # (data, note) when the command already checked the data (prepare_data)
        self.given_start = start  # output.dir's lock and checkpoint when the command already took them (open_run)
        self.run_dir = Path(cfg.output.dir).expanduser()
        self.ranks = dist.ranks_from_env()
        self.rank, self.world = self.ranks.rank, self.ranks.world
        sharding.require_processes(cfg.train.shard, self.ranks)
        self.step = 0
        self.stop_signal: int | None = None
        self.skipped = 0
        self.label_tokens_seen = 0
        self.train_seconds = 0.0
        self.outcome: dict[str, Any] = {}  # rank 0: how the run ended, for `samebox train --json`

    # ----- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        dist.init(self.ranks)
        torch.manual_seed(self.cfg.train.seed)
        self.start = self.given_start or rundir.open_run(self.cfg, self.resume, self.overwrite,
                                                         self.resume_changed_data, self.ranks)
        if self.overwrite and self.rank == 0:
            rundir.clear_run(self.run_dir)
        self._setup_data()  # the data, its rows and the tokenizer are checked before the weights load
        rundir.check_samples(self.start, len(self.data))
        self._setup_model()
        STARTUP.mark("weights")
        dist.broadcast_params(self.params, self.ranks, self.loaded.device)
        self._restore_adapter()  # into the whole adapter, before any sharding
        self._shard()
        self._setup_optimizer()
        self._restore()
        # The record continues from the step resumed at: no row of a killed run's stale tail stays.
        self.logger = MetricsLogger(self.cfg.output, self.run_dir, self.total_steps, self.cfg.to_dict(),
                                    enabled=self.rank == 0, start_step=self.step)
        if self.rank == 0:
            write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            self.logger.event(self._describe())
            if self.world > self.cfg.train.samples_per_step:
                self.logger.event(f"train.samples_per_step={self.cfg.train.samples_per_step} is less than the "
                                  f"{self.world} processes: some GPUs idle every step")
        self.previous_handlers = {sig: signal.signal(sig, self._request_stop)
                                  for sig in (signal.SIGTERM, signal.SIGINT)}
        self.memory.mark("load")  # weights, adapter, a restored optimizer: what the steps start from
        STARTUP.mark("ready")

    def _setup_model(self) -> None:
        loaded, path = setup_model(self.cfg.model, self.cfg.lora, self.cfg.train, self._step_tokens(),
                                   packing_allowed=self.cfg.data.packing != "false")
        self.loaded: LoadedModel = loaded
        self.memory = MemoryPhases(loaded.device)
        self.path = path
        self.checkpointing = path.checkpointing
        self.model = loaded.model
        self.decoder, self.head = decoder_and_head(self.model, path.fused)
        vocab = self.head.weight.shape[0]
        self.step_loss = StepLoss(self.decoder, self.head, loaded.device, loaded.dtype,
                                  loss_chunk_rows(self.cfg.train.loss_chunk_tokens, vocab), self.memory.mark)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # The fused layers and flash-attn take packed rows with the samples' boundaries (varlen attention).
        self.varlen = path.fused is not None or loaded.attention == "flash_attention_2"
        self.packing = self.cfg.data.packing == "true" or (self.cfg.data.packing == "auto" and self.varlen)

    def _shard(self) -> None:
        """train.shard=fsdp: the FSDP2 units (this rank's shards to its device); then the micro-batch budget, from
        the memory left once the weights are where they train."""
        gathered = 0
        if self.path.sharded:
            layers = sharding.decoder_layers(self.decoder)
            embedding = sharding.input_embedding(self.decoder, self.step_loss)
            gathered = sharding.gathered_bytes(self.step_loss, layers, embedding)
            sharding.shard(self.step_loss, layers, self.loaded.device, self.ranks, embedding)
            self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2's sharded parameters
        self.budget = micro_batch_budget(self.cfg.train, self.loaded, self.path, self._step_tokens(), gathered)

    def _step_tokens(self) -> int:
        """The most tokens this process can get in one optimizer step: what the auto budget need not exceed."""
        longest = sorted(self.lengths, reverse=True)[: self.cfg.train.samples_per_step]
        return min(sum(longest), math.ceil(sum(longest) / self.world) + longest[0])

    def _setup_data(self) -> None:
        self.data: TokenizedData
        self.data, self.data_note = self.prepared or prepare_data(self.cfg)
        self.label_counts = [self.data.label_count(i) for i in range(len(self.data))]
        self.lengths = [len(s) for s in self.data.input_ids]
        per_epoch = steps_per_epoch(len(self.data), self.cfg.train.samples_per_step)
        self.total_steps = self.cfg.train.max_steps or per_epoch * self.cfg.train.epochs

    def _setup_optimizer(self) -> None:
        t = self.cfg.train
        fused = self.loaded.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
        warmup = max(1, int(t.warmup_ratio * self.total_steps)) if t.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(warmup, self.total_steps, t.min_lr_ratio))
        self.scaler = torch.amp.GradScaler("cuda") if self.loaded.dtype == torch.float16 else None

    def _restore_adapter(self) -> None:
        """The LoRA weights of the checkpoint open_run chose (verified, of the same data)."""
        path = self.resumed_from = self.start.checkpoint
        if path is None:
            return
        ckpt.load_adapter(path, self.model)
        self.resumed_state = self.start.state

    def _restore(self) -> None:
        """The rest of the checkpoint open_run chose: optimizer, scheduler, RNG and counters."""
        path = self.resumed_from
        if path is None:
            return
        if self.path.sharded:
            saved = ckpt.load_optimizer_file(path) if self.rank == 0 else {}
            sharding.load_optimizer_state(self.model, self.optimizer, saved)
        else:
            self.optimizer.load_state_dict(ckpt.load_optimizer_file(path))
        ckpt.load_schedule_and_rng(path, self.scheduler, self.rank)
        state = self.resumed_state
        self.step = state["step"]
        self.budget = state["micro_batch_tokens"]
        self.skipped = state["skipped"]
        self.label_tokens_seen = state["label_tokens_seen"]
        self.train_seconds = state["train_seconds"]

    def _describe(self) -> str:
        resumed = f", resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""
        trainable = sum(p.numel() for p in self.params)
        ranks = f"; {self.world} processes, {self.cfg.train.samples_per_step} samples per step in all" \
            if self.world > 1 else ""
        return (f"{self.loaded.model_dir} on {self.loaded.device} ({self.cfg.model.quantization}, "
                f"{self.loaded.dtype}, {self.loaded.attention}, {'packed' if self.packing else 'padded buckets'}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}); {self.path.note}; micro-batches of up to "
                f"{self.budget} tokens; {trainable:,} trainable; {self.data_note}; {self.total_steps} steps"
                f"{ranks}{resumed}")

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        # A second Ctrl-C stops at once.
        signal.signal(signum, signal.SIG_DFL)

    # ----- train -------------------------------------------------------------------------------------------
    def _step_samples(self, step: int) -> list[int]:
        return step_indices(len(self.data), self.cfg.train.samples_per_step, step, self.cfg.train.seed,
                            self.cfg.data.shuffle)

    def _train_one(self) -> dict[str, Any]:
        t = self.cfg.train
        started = time.perf_counter()
        indices = self._step_samples(self.step)
        local = dist.share_of_step(indices, self.lengths, self.ranks)
        label_total = sum(self.label_counts[i] for i in indices)
        tokens = sum(self.lengths[i] for i in indices)
        pad_id = self.loaded.tokenizer.pad_token_id

        def make(budget: int) -> list:
            batches = build_micro_batches(self.data, local, budget, self.packing, self.varlen, pad_id) if local else []
            if self.path.sharded:  # every FSDP2 forward/backward is a collective: all ranks run as many
                most = dist.most_over_ranks(len(batches), self.loaded.device, self.ranks)
                batches += [idle_micro_batch(pad_id, self.varlen) for _ in range(most - len(batches))]
            if "start" not in clock.marks:  # the batches are cut: the GPU's work begins (an out-of-memory retry's
                clock.mark("start")         # failed attempts stay inside compute_s)
            return batches

        clock = dist.StepClock(self.loaded.device)
        result = run_step(self.step_loss, make, self.params, label_total, self.budget, self.loaded.device,
                          scale=self.scaler.scale if self.scaler else None,
                          on_oom=lambda b: self.logger.event(f"out of memory: micro-batch budget now {b} tokens"),
                          retry_oom=not self.path.sharded, mark=self.memory.mark)
        self.budget = result.budget
        loss_sum = result.loss_sum
        clock.mark("computed")
        dist.all_reduce_step([] if self.path.sharded else self.params, loss_sum, self.ranks)
        clock.mark("reduced")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm, loss_value = clip_and_check(self.params, t.max_grad_norm, loss_sum)
        lr = self.scheduler.get_last_lr()[0]
        skipped = None
        if not is_finite(grad_norm, loss_value):
            skipped = "non-finite loss" if not math.isfinite(loss_value) else "non-finite gradient"
            self.skipped += 1
        else:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.memory.mark("optimizer")  # the all-reduce, clipping and the update (AdamW's moments appear at step 1)
        self.step += 1
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        self.label_tokens_seen += label_total
        row: dict[str, Any] = {
            "step": self.step, "loss": loss_value / max(label_total, 1), "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "label_tokens": label_total, "micro_batches": result.micro_batches,
            "step_s": elapsed, "tokens_per_s": tokens / elapsed, "label_tokens_per_s": label_total / elapsed,
            "eta_s": self.train_seconds / max(1, self.step) * (self.total_steps - self.step),
            # GPU time between marks on this rank's stream (clip_and_check's sync has passed them): compute_s from
            # its micro-batches being cut to its backward's end (a GPU that waits on the host in between counts),
            # reduce_s its gradient all-reduce, which holds the wait for the slowest rank. Under train.shard=fsdp
            # the all-gathers, the reduce-scatter and their waits are inside compute_s, and reduce_s is the loss's
            # all-reduce alone. What step_s holds beyond the two is host time that no GPU work overlapped.
            "compute_s": clock.span("start", "computed"), "reduce_s": clock.span("computed", "reduced"),
        }
        if self.loaded.device.type == "cuda":
            row["mem_gib"] = self.memory.take_step_peak()  # this step's own peak (trainer/loop/memory.py)
        if skipped:
            row["skipped"] = skipped
        if result.oom_retries:
            row["oom_retries"] = result.oom_retries
        return row

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The whole LoRA weights by name; under FSDP2 gathered to rank 0 (every rank calls this)."""
        if self.path.sharded:
            return sharding.trainable_state(self.model)
        return ckpt.trainable_state(self.model)

    def save(self) -> Path | None:
        began = time.monotonic()
        if self.rank == 0:
            ckpt.clear_staging(self.run_dir, self.step)
        dist.barrier(self.ranks)
        ckpt.write_rank_rng(self.run_dir, self.step, self.rank)
        trainable = self._trainable_state()
        optimizer_state = sharding.optimizer_state(self.model, self.optimizer) if self.path.sharded else \
            self.optimizer.state_dict()
        dist.barrier(self.ranks)
        path = None
        if self.rank == 0:
            state = {"step": self.step, "total_steps": self.total_steps, "micro_batch_tokens": self.budget,
                     "skipped": self.skipped, "label_tokens_seen": self.label_tokens_seen,
                     "train_seconds": self.train_seconds, "world_size": self.world,
                     "data": {"samples": len(self.data), "samples_per_step": self.cfg.train.samples_per_step,
                              "seed": self.cfg.train.seed, "shuffle": self.cfg.data.shuffle,
                              "path": str(Path(self.cfg.data.path).expanduser()),
                              "sha256": self.start.data_sha256}}
            path = ckpt.commit_checkpoint(self.run_dir, self.step, self.model, trainable, optimizer_state,
                                          self.scheduler, state, self.cfg.output.keep_last)
        dist.barrier(self.ranks)
        self.memory.mark("save")
        STARTUP.saved(time.monotonic() - began)
        return path

    def train(self) -> int:
        out = self.cfg.output
        if self.step >= self.total_steps:
            self.logger.event(f"already finished ({self.step}/{self.total_steps} steps); nothing to do")
            self._ended("already finished")
            return 0
        self.model.train()
        last_save = time.monotonic()
        while self.step < self.total_steps:
            row = self._train_one()
            if "step_1" not in STARTUP.marks:
                STARTUP.mark("step_1")
                self.logger.event(STARTUP.line())
            by_time = time.monotonic() - last_save >= out.save_every_minutes * 60
            (stop, by_time), ranks = dist.exchange([self.stop_signal is not None, by_time],
                                                   [row[k] for k in RANK_TIMES], self.loaded.device, self.ranks)
            if self.world > 1:  # where each rank's step went: the slowest rank's compute sets everyone's pace
                for i, key in enumerate(RANK_TIMES):
                    row[f"rank_{key}"] = [r[i] for r in ranks]
            self.logger.log(row)
            if stop or by_time or self.step % out.save_every_steps == 0 or self.step == self.total_steps:
                path = self.save()
                last_save = time.monotonic()
                if path is not None:
                    self.logger.event(f"checkpoint {path}")
            if stop:
                self.logger.event(f"stopped by signal at step {self.step}; resume with --resume auto")
                self._ended("stopped", checkpoint=str(path) if path else None)
                return 0
        self._finish()
        return 0

    def _finish(self) -> None:
        trainable = self._trainable_state()
        if self.rank != 0:
            return
        self.model.save_pretrained(str(self.run_dir / "adapter"), state_dict=trainable)
        readable_files(self.run_dir / "adapter")
        summary = {"steps": self.step, "skipped_steps": self.skipped, "label_tokens": self.label_tokens_seen,
                   "train_seconds": self.train_seconds, "attention": self.loaded.attention,
                   "packing": self.packing, "gradient_checkpointing": self.checkpointing,
                   "fused_layers": self.path.fused is not None, "path": self.path.note,
                   "shard": self.cfg.train.shard,
                   "micro_batch_tokens": self.budget, "startup": STARTUP.to_dict()}
        if self.loaded.device.type == "cuda":
            # The whole process's peak, and each phase's: memory_gib.train (the steps alone) is what peers that
            # reset the allocator's peak after loading report.
            summary["peak_mem_gib"] = self.memory.process_peak()
            summary["memory_gib"] = self.memory.summary()
            summary["peak_reserved_gib"] = self.memory.process_reserved()
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        self.logger.event(f"done: adapter in {self.run_dir / 'adapter'}")
        self._ended("finished", adapter=str(self.run_dir / "adapter"), **summary)

    def _ended(self, status: str, **facts: Any) -> None:
        if self.rank == 0:
            self.outcome = {"status": status, "run_dir": str(self.run_dir), "steps": self.step,
                            "total_steps": self.total_steps, **facts}

    # ----- cleanup -----------------------------------------------------------------------------------------
    def cleanup(self, clean: bool = True) -> None:
        for sig, handler in getattr(self, "previous_handlers", {}).items():
            signal.signal(sig, handler)
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if self.given_start is None and getattr(self, "start", None) is not None:
            self.start.release()
        dist.shutdown(self.ranks, clean)


def main(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False,
         prepared: tuple[TokenizedData, str] | None = None, resume_changed_data: bool = False,
         start: rundir.RunStart | None = None, outcome: dict[str, Any] | None = None) -> int:
    """Set up, train, clean up; ``outcome`` (when given) receives how the run ended on rank 0: status (finished,
    stopped, already finished), steps and, once finished, the adapter and summary.json's facts."""
    recipe = LoRAFinetuneRecipe(cfg, resume, overwrite, prepared, resume_changed_data, start)
    clean = False
    try:
        recipe.setup()
        code = recipe.train()
        clean = True
        return code
    finally:
        recipe.cleanup(clean)
        if outcome is not None:
            outcome.update(recipe.outcome)
