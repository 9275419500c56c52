"""train.shard=fsdp under torchrun (2 processes, gloo on CPU, fp32 LoRA): FSDP2 shards the model and the run is the
1-process run: the same per-step losses and gradient norms, the same adapter at the end, checkpoints in the same
files, SIGTERM + --resume auto continuing the same loss curve. A step where the two ranks cut different numbers of
micro-batches is part of the run (the idle micro-batches). One process with train.shard=fsdp is refused.

Tolerances: fp32 with the gradient sums split over two ranks differs from one process in summation order only
(measured: relative 1e-7 on losses); a reduce-scatter left averaging (gradient halved) is off by ~1e-3 from step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from builder.cli import main as cli_main
from tests.trainer.test_distributed import _rows, _torchrun_until
from trainer.data.batching import plan_micro_batches
from trainer.loop.distributed import Ranks, share_of_step
from trainer.loop.recipe import LoRAFinetuneRecipe

REPO = Path(__file__).resolve().parents[2]
SHARDED = ("train.shard=fsdp", "model.gradient_checkpointing=true", "train.samples_per_step=5", "train.fused=false",
           "train.micro_batch_tokens=48", "data.packing=true", "train.lr=2e-2")


def _torchrun(config_file: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "builder", "train", str(config_file), "--no-preflight", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _reference(make_config, overrides: tuple[str, ...], steps: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The same config in one process, unsharded: its step rows and its adapter as save_pretrained writes it."""
    from peft import get_peft_model_state_dict

    recipe = LoRAFinetuneRecipe(make_config(overrides=(*overrides, "train.shard=none"), name="one-process"))
    recipe.setup()
    recipe.model.train()
    rows = [recipe._train_one() for _ in range(steps)]
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(recipe.model).items()}
    recipe.cleanup()
    return rows, adapter


def _uneven_steps(make_config, steps: int) -> list[int]:
    """Steps whose two shares are cut into different numbers of micro-batches (the rank with fewer runs idle ones)."""
    recipe = LoRAFinetuneRecipe(make_config(overrides=(*SHARDED, "train.shard=none"), name="plan"))
    recipe._setup_data()
    uneven = []
    for step in range(steps):
        shares = [share_of_step(recipe._step_samples(step), recipe.lengths, Ranks(r, 2)) for r in range(2)]
        counts = {len(plan_micro_batches([recipe.lengths[i] for i in s], recipe.cfg.train.micro_batch_tokens, True))
                  for s in shares}
        if len(counts) > 1:
            uneven.append(step + 1)
    return uneven


@pytest.mark.slow
def test_two_sharded_processes_train_like_one(make_config, tmp_path):
    overrides = (*SHARDED, "train.max_steps=4", "output.save_every_steps=2")
    cfg = make_config(overrides=overrides, name="fsdp")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    done = _torchrun(config_file)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "FSDP2-sharded transformers + peft layers" in out and "2 processes, 5 samples per step in all" in out

    run_dir = Path(cfg.output.dir)
    rows = _rows(run_dir)
    expected, adapter = _reference(make_config, overrides, 4)
    assert _uneven_steps(make_config, 4), "no step exercised the idle micro-batches"
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["label_tokens"] for r in rows] == [r["label_tokens"] for r in expected]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=0)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4, abs=0)

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(adapter)  # the whole adapter, not rank 0's shards
    for key, value in adapter.items():
        assert saved[key].shape == value.shape, key
        # AdamW divides by sqrt(v): where a gradient is near 0, summation order moves a weight by up to ~1e-5
        # (measured 6e-6), against steps of lr=2e-2.
        torch.testing.assert_close(saved[key], value, rtol=1e-3, atol=2e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["shard"] == "fsdp" and summary["path"].startswith("FSDP2-sharded")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-00000004").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "optimizer.pt", "rng-0.pt",
        "rng-1.pt", "scheduler.pt", "trainer_state.json"]


@pytest.mark.slow
def test_sharded_run_survives_sigterm_and_resumes_with_the_same_losses(make_config, tmp_path):
    overrides = (*SHARDED, "train.max_steps=100000", "output.save_every_steps=1000", "output.keep_last=5")
    cfg = make_config(overrides=overrides, name="fsdp-resume")
    run_dir = Path(cfg.output.dir)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))

    first = _torchrun_until(config_file, run_dir, 2)
    stopped = len(_rows(run_dir))
    assert f"stopped by signal at step {stopped};" in first
    ckpt = run_dir / "checkpoints" / f"step-{stopped:08d}"
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sorted(optimizer) == ["param_groups", "state"] and sorted(optimizer["state"]) == list(
        range(len(optimizer["param_groups"][0]["params"])))  # optimizer.state_dict()'s own layout, every parameter

    second = _torchrun_until(config_file, run_dir, stopped + 2, "--resume", "auto")
    assert f"resumed from {ckpt} at step {stopped}" in second
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    expected, _ = _reference(make_config, overrides, len(rows))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=0)

    # The checkpoint's files are the unsharded run's: one process resumes it with train.shard=none.
    unsharded = LoRAFinetuneRecipe(make_config(overrides=(*overrides, "train.shard=none"), name="fsdp-resume"),
                                   resume=str(ckpt))
    unsharded.setup()
    unsharded.model.train()
    more = [unsharded._train_one()["loss"] for _ in range(2)]
    unsharded.cleanup()
    assert more == pytest.approx([r["loss"] for r in expected[stopped:stopped + 2]], rel=1e-5, abs=0)


def test_fsdp_in_one_process_or_with_fp16_exits_2_saying_what_works(tmp_path, capsys, tiny_model_dir):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\n  dtype: fp32\ndata:\n  path: d.jsonl\n")
    (tmp_path / "d.jsonl").write_text('{"instruction": "reverse: cat dog", "output": "dog cat"}\n')
    args = ["train", str(config), "--no-preflight", f"output.dir={tmp_path / 'run'}", f"data.path={tmp_path}/d.jsonl",
            f"data.cache_dir={tmp_path / 'cache'}", "train.shard=fsdp"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "train.shard=fsdp" in err and "torchrun --nproc_per_node N -m builder train" in err
    assert "Traceback" not in err
    assert cli_main([*args, "model.dtype=fp16"]) == 2
    assert "train.shard=fsdp trains in bf16 or fp32" in capsys.readouterr().err


@pytest.mark.slow
def test_4bit_weights_shard_and_give_the_unsharded_gradient(tiny_model_dir, tmp_path):
    """NF4 with bnb_4bit_quant_storage=bf16 (quantization_config under fsdp) through trainer.loop.sharding's units, on
    bitsandbytes' CPU backend: the packed weights are split like any other, each rank restores the quant state
    after the all-gather, and the summed shards' gradients are the one-process ones (the same bf16 arithmetic per
    row; a sum of two fp32 terms is exact in either order)."""
    script = Path(__file__).with_name("fsdp_nf4_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    runs = [[sys.executable, str(script), str(tiny_model_dir), str(one)],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
             str(tiny_model_dir), str(two)]]
    for argv in runs:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    alone, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    weight = sharded["weight"]
    assert weight["dtype"] == "torch.bfloat16" and weight["kind"] == "DTensor"
    assert weight["local_rows"] * 2 == weight["full_rows"]
    assert weight["embedding_unit"] == "FSDPEmbedding"  # the table is a unit of its own (untied: not lm_head's)
    # ... gathered for the lookup only: frozen, it has no backward, so nothing may gather it again there (FSDP2's
    # default prefetch of the unit that ran before layer 0 would, and keep it whole to the end of the backward).
    assert weight["table_gathers"] == ["forward"]
    assert sharded["loss_sum"] == pytest.approx(alone["loss_sum"], rel=1e-6)
    assert sorted(sharded["grads"]) == sorted(alone["grads"]) and len(alone["grads"]) == 28
    for name, grad in alone["grads"].items():
        assert any(grad), name
        torch.testing.assert_close(torch.tensor(sharded["grads"][name]), torch.tensor(grad), rtol=1e-5, atol=1e-7)


def test_fsdp_on_a_torch_without_fsdp2_says_which_images_have_it(monkeypatch) -> None:
    """The older catalog images (torch 2.1, 2.3, 2.5) train replicated: shard=fsdp there is a clear refusal."""
    from builder.core.errors import SameboxError
    from trainer.loop import sharding
    from trainer.loop.distributed import Ranks

    monkeypatch.setattr(sharding, "_torch_release", lambda: (2, 3))
    with pytest.raises(SameboxError, match=r"train.shard=fsdp needs torch >= 2.6 \(FSDP2\)"):
        sharding.require_processes("fsdp", Ranks(0, 2, 0))
    sharding.require_processes("none", Ranks(0, 1, 0))  # the replicated path asks nothing of torch


def test_the_embedding_table_is_its_own_unit_unless_lm_head_shares_it():
    """Untied, the table is gathered only for its lookup (its own unit; the gathered-memory estimate counts it
    once, at the forward's start); tied to lm_head it stays in the root, where the chunked loss reads it."""
    from trainer.loop import sharding

    class Body(torch.nn.Module):
        def __init__(self, table: torch.nn.Embedding) -> None:
            super().__init__()
            self.embed_tokens = table
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False) for _ in range(3)])

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed_tokens

    class Root(torch.nn.Module):
        def __init__(self, body: Body, head: torch.nn.Linear) -> None:
            super().__init__()
            self.decoder, self.head = body, head

    table = torch.nn.Embedding(100, 8)
    untied = Root(Body(table), torch.nn.Linear(8, 100, bias=False))
    assert sharding.input_embedding(untied.decoder, untied) is table
    layer = 8 * 8 * 4
    # root: head (3,200 B) + the larger of two layers (512 B) and the table (3,200 B)
    assert sharding.gathered_bytes(untied, list(untied.decoder.layers), table) == 3200 + 3200
    assert sharding.gathered_bytes(untied, list(untied.decoder.layers)) == 3200 + 3200 + 2 * layer

    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = table.weight
    tied = Root(Body(table), head)
    assert sharding.input_embedding(tied.decoder, tied) is None
    assert sharding.input_embedding(torch.nn.Module(), untied) is None
