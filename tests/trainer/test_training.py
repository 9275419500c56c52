"""Training on a tiny random Qwen2 (CPU): loss falls, packing == padding, chunked loss, OOM and NaN handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.conftest import alpaca_rows
from trainer.data.batching import build_micro_batches, plan_micro_batches, step_indices
from trainer.loop import step as step_mod
from trainer.loop.recipe import LoRAFinetuneRecipe, main
from trainer.model.loss import AUTO_CHUNK_BYTES, chunked_cross_entropy_sum, loss_chunk_rows


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_chunked_loss_matches_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    targets[0, :3] = -100
    full = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), targets.reshape(-1), reduction="sum")
    gh, gw = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, chunk=3)
    ch, cw = torch.autograd.grad(chunked * 1.0, (hidden, weight))
    assert torch.allclose(full, chunked) and torch.allclose(gh, ch) and torch.allclose(gw, cw)


def test_chunked_loss_is_stable_on_large_logits():
    """Logits in the thousands (exp overflows fp32 unless the row maximum is taken out first)."""
    torch.manual_seed(1)
    hidden = (torch.randn(9, 16) * 300).requires_grad_()
    weight = torch.randn(40, 16)
    targets = torch.randint(0, 40, (9,))
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (gh,) = torch.autograd.grad(full, (hidden,))
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, chunk=4)
    (ch,) = torch.autograd.grad(chunked, (hidden,))
    assert torch.isfinite(chunked) and torch.allclose(full, chunked, rtol=1e-5) and torch.allclose(gh, ch, atol=1e-4)


def test_auto_loss_chunk_keeps_the_fp32_logits_small():
    """auto: a Qwen2.5 vocabulary gets 256-token chunks (156 MB of fp32 logits; 1,024 tokens, 623 MB, set the 7B
    QLoRA's peak), a small vocabulary bigger ones; a number is taken as given."""
    assert loss_chunk_rows("auto", 152064) == 256
    assert loss_chunk_rows("auto", 151936) == 256
    assert loss_chunk_rows("auto", 32000) == 1280
    assert loss_chunk_rows("auto", 10**8) == 64
    for vocab in (1000, 32000, 128256, 152064, 256000):
        rows = loss_chunk_rows("auto", vocab)
        assert rows % 64 == 0 and (rows == 64 or 4 * rows * vocab <= AUTO_CHUNK_BYTES)
    assert loss_chunk_rows(1024, 152064) == 1024


def test_micro_batches_respect_the_budget_and_steps_cover_the_epoch():
    lengths = [300, 50, 120, 700, 90, 10]
    for packing in (True, False):
        groups = plan_micro_batches(lengths, 400, packing)
        assert sorted(i for g in groups for i in g) == list(range(6))
        for g in groups:
            cost = sum(lengths[i] for i in g) if packing else len(g) * max(lengths[i] for i in g)
            assert cost <= 400 or len(g) == 1
    seen = [i for s in range(3) for i in step_indices(20, 8, s, seed=1, shuffle=True)]
    assert sorted(seen) == list(range(20))
    assert step_indices(20, 8, 4, 1, True) == step_indices(20, 8, 4, 1, True) != step_indices(20, 8, 1, 1, True)
    # The epoch's order is drawn once, not at every step (a shuffle of N samples per step idles the GPU).
    from trainer.data.batching import epoch_order

    epoch_order.cache_clear()
    for s in range(8):
        step_indices(20, 8, s, seed=1, shuffle=True)
    assert epoch_order.cache_info().misses == 3  # epochs 0, 1, 2 (3 steps each)


def test_loss_falls_and_everything_is_written(make_config):
    cfg = make_config(overrides=("train.epochs=3", "train.lr=1e-2", "output.tensorboard=true"))
    assert main(cfg) == 0
    run = Path(cfg.output.dir)
    rows = read_metrics(run)
    assert len(rows) == 24
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first * 0.9, (first, last)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-00000024" / "optimizer.pt").is_file()
    assert any((run / "tensorboard").iterdir())
    assert json.loads((run / "summary.json").read_text())["steps"] == 24


def _step_loss_and_grads(make_config, packing: str, budget: int):
    cfg = make_config(overrides=(f"data.packing={packing}", f"train.micro_batch_tokens={budget}",
                                 "lora.targets=all-linear"), name=f"p-{packing}-{budget}")
    recipe = LoRAFinetuneRecipe(cfg)
    recipe.setup()
    try:
        # LoRA B starts at zero; make it non-zero so every LoRA weight gets a gradient.
        torch.manual_seed(1)
        for p in recipe.params:
            p.data.normal_(0, 0.05)
        recipe.model.train()
        indices = recipe._step_samples(0)
        label_total = sum(recipe.label_counts[i] for i in indices)
        recipe.step_loss.chunk = 64
        result = step_mod.run_step(
            recipe.step_loss, lambda b: build_micro_batches(recipe.data, indices, b, recipe.packing, recipe.varlen, 0),
            recipe.params, label_total, recipe.budget, recipe.loaded.device)
        return result, float(result.loss_sum) / label_total, [p.grad.clone() for p in recipe.params]
    finally:
        recipe.cleanup()


def test_packed_and_padded_batches_give_the_same_loss_and_gradient(make_config):
    packed, packed_loss, packed_grads = _step_loss_and_grads(make_config, "true", 4096)
    padded, padded_loss, padded_grads = _step_loss_and_grads(make_config, "false", 64)
    assert packed.micro_batches == 1 and padded.micro_batches > 2
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_the_budget(make_config, monkeypatch):
    real = step_mod.forward_loss_sum

    def small_memory(decoder, head, mb, *args):
        if mb.tokens > 100:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        return real(decoder, head, mb, *args)

    monkeypatch.setattr(step_mod, "forward_loss_sum", small_memory)
    cfg = make_config(overrides=("train.max_steps=2", "data.packing=true", "train.micro_batch_tokens=1024"))
    assert main(cfg) == 0
    rows = read_metrics(Path(cfg.output.dir))
    assert rows[0]["oom_retries"] >= 3 and rows[0]["micro_batches"] > 1 and "oom_retries" not in rows[1]
    assert all(r["loss"] == r["loss"] for r in rows)


def test_non_finite_step_is_skipped_and_reported(make_config, monkeypatch, capsys):
    real = step_mod.forward_loss_sum
    calls = {"n": 0}

    def nan_once(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(step_mod, "forward_loss_sum", nan_once)
    cfg = make_config(overrides=("train.max_steps=3", "train.micro_batch_tokens=4096", "data.packing=true"))
    recipe = LoRAFinetuneRecipe(cfg)
    recipe.setup()
    before = [p.detach().clone() for p in recipe.params]
    recipe.model.train()
    row = recipe._train_one()
    assert row["skipped"] == "non-finite loss" and recipe.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, recipe.params, strict=True))
    assert recipe.scheduler.last_epoch == 0
    assert "skipped" not in recipe._train_one()
    recipe.cleanup()


def test_packed_samples_do_not_see_each_other(tiny_model_dir, tokenizer):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from packing_check import packing_isolation  # bench/: the benchmark's check, run here on the tiny model

    rows = [r["instruction"] + " " + r["output"] for r in alpaca_rows(4)]
    result = packing_isolation(tiny_model_dir, [tokenizer(t)["input_ids"] for t in rows], torch.float32)
    assert result["packed_vs_alone_rel_diff"] < 1e-5 < 1e-2 < result["unbounded_vs_alone_rel_diff"], result


def test_the_final_adapter_loads_into_peft_with_the_trained_weights(make_config, tiny_model_dir):
    """adapter/ is what `samebox serve` and `samebox export` load: peft must read back exactly the weights of the
    last checkpoint (the same step), trained B matrices included, not a fresh LoRA init."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = make_config(overrides=("train.max_steps=3",), name="adapter-roundtrip")
    assert main(cfg) == 0
    run = Path(cfg.output.dir)
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    last = load_file(str(run / "checkpoints" / "step-00000003" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(last) and all(torch.equal(final[k], last[k]) for k in final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(final)
    for name, value in final.items():
        peft_name = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                  ".lora_B.default.weight")
        torch.testing.assert_close(loaded[peft_name], value, rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k), "B stayed at its zero init"


def test_out_of_memory_errors_say_what_torch_asked_for():
    from trainer.loop.step import oom_request

    # torch's message (c10's CUDA caching allocator) for a process held to 16 GiB of an 80 GB card.
    torch_said = ("CUDA out of memory. Tried to allocate 1.16 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                  "62.80 GiB is free. Including non-PyTorch memory, this process has 16.37 GiB memory in use. "
                  "16.00 GiB allowed; Of the allocated memory 15.28 GiB is allocated by PyTorch, and 0.68 GiB is "
                  "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
                  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
    assert oom_request(torch_said) == (" (torch asked for 1.16 GiB; GPU 0: 79.19 GiB, 62.80 GiB free; this process is "
                                       "allowed 16.00 GiB)")
    uncapped = torch_said.replace("16.00 GiB allowed; ", "")
    assert oom_request(uncapped) == " (torch asked for 1.16 GiB; GPU 0: 79.19 GiB, 62.80 GiB free)"
    assert oom_request("fake: CUDA out of memory") == ""
