"""Model setup: LoRA targets must all match, and the path the trainer takes is the one it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.core.errors import SameboxError
from trainer.loop.recipe import LoRAFinetuneRecipe, main


def test_a_lora_target_that_matches_nothing_is_an_error_naming_the_real_ones(make_config):
    cfg = make_config(overrides=("lora.targets=[q_proj, qproj]",))
    recipe = LoRAFinetuneRecipe(cfg)
    with pytest.raises(SameboxError) as err:
        recipe.setup()
    recipe.cleanup()
    assert "['qproj']" in str(err.value) and "q_proj" in err.value.hint and "all-linear" in err.value.hint


@pytest.mark.parametrize("overrides,fused", [
    ((), True),
    (("lora.dropout=0.1",), False),  # dropout: transformers + peft
    (("train.fused=false",), False),
    (("data.packing=false",), False),  # the fused layers take packed rows only
])
def test_summary_says_which_path_trained(make_config, overrides, fused):
    cfg = make_config(overrides=("train.max_steps=1", "train.micro_batch_tokens=auto", *overrides),
                      name="path-" + "-".join(o.replace("=", "_") for o in overrides))
    assert main(cfg) == 0
    summary = json.loads((Path(cfg.output.dir) / "summary.json").read_text())
    assert summary["fused_layers"] is fused
    assert summary["path"].startswith("fused layers" if fused else "transformers + peft")
    # auto on the CPU: the step's tokens (capped at 16384), so a packed step is one micro-batch
    rows = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert 0 < summary["micro_batch_tokens"] <= 16384 and steps[0]["tokens"] <= summary["micro_batch_tokens"]
    if fused:
        assert steps[0]["micro_batches"] == 1


def test_weights_that_overflow_the_gpu_say_how_to_fit_them(make_config, monkeypatch):
    """Loading a model too big for the card ends in the allocator's error inside from_pretrained: the user gets what
    would fit it (QLoRA, the model sharded over GPUs) with exit 2, not the traceback."""
    from transformers import AutoModelForCausalLM

    from trainer.model import load as model

    def overflow(*_args, **_kwargs):
        raise model.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 270.00 MiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", overflow)
    cfg = make_config(overrides=("train.max_steps=1",), name="overflow")
    recipe = LoRAFinetuneRecipe(cfg)
    with pytest.raises(SameboxError) as err:
        recipe.setup()
    recipe.cleanup()
    assert "do not fit one GPU" in err.value.message and "(none)" in err.value.message
    assert "model.quantization=nf4" in err.value.hint and "train.shard=fsdp" in err.value.hint


def test_a_sharded_load_quantizes_on_this_process_share_of_the_cores(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1; the host-side load of a sharded run takes cores / local processes, then
    gives them back (training keeps torchrun's setting)."""
    import torch

    from trainer.model.load import host_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with host_threads(True):
            assert torch.get_num_threads() == 4
        assert torch.get_num_threads() == 1
        with host_threads(False):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_process_held_to_part_of_a_card_sizes_itself_by_that_part(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction (a card shared, or a big card acting as a 24 GB one) caps the
    allocator, which cudaMemGetInfo does not see: the free memory the trainer sizes micro-batches and gradient
    checkpointing by, and its "do not fit" message, use the cap."""
    import torch

    from trainer.config import ModelConfig
    from trainer.model import load as model

    gib = 2**30
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert model.gpu_free_bytes(cuda) == (139 * gib, 140 * gib, 1.0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 16 / 140)
    free, total, fraction = model.gpu_free_bytes(cuda)
    assert abs(free - 11 * gib) < 1024 and total == 140 * gib  # 16 GiB held, 5 of them reserved already
    message = model.weights_do_not_fit("m", ModelConfig(quantization="nf4"), cuda).message
    assert "11.0 GiB free now" in message and "held to 16.0 GiB of it" in message
    # The same cap sizes auto gradient checkpointing and the auto micro-batch budget.
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064)
    base = SimpleNamespace(config=config)
    auto = ModelConfig(gradient_checkpointing="auto")
    held = model.wants_checkpointing(auto, base, cuda, torch.bfloat16, 4096)  # ~42 GB without it
    held_budget = model.auto_budget(config, None, cuda, torch.bfloat16, 10**6, 40 * 10**6, 256)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert held and not model.wants_checkpointing(auto, base, cuda, torch.bfloat16, 4096)
    assert held_budget < model.auto_budget(config, None, cuda, torch.bfloat16, 10**6, 40 * 10**6, 256)
