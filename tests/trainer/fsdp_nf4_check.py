"""The 4-bit FSDP2 wiring on the CPU (bitsandbytes' CPU backend; the trainer itself refuses nf4 without a GPU):
``python fsdp_nf4_check.py MODEL_DIR OUT.json`` runs two rows unsharded in one process; under
``torchrun --nproc_per_node 2`` each rank runs one row through trainer.loop.sharding's units. Rank 0 writes the step's
loss sum, each LoRA weight's whole gradient and what a 4-bit weight looked like after sharding. Run by
tests/trainer/test_sharding.py."""

from __future__ import annotations

import json
import sys

import torch


def main(model_dir: str, out: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.config import ModelConfig
    from trainer.data.batching import MicroBatch
    from trainer.data.dataset import IGNORE
    from trainer.loop import distributed as dist
    from trainer.loop import sharding
    from trainer.loop.step import StepLoss
    from trainer.model.load import decoder_and_head, quantization_config

    ranks = dist.ranks_from_env()
    dist.init(ranks)
    cpu = torch.device("cpu")
    # The config the trainer gives a GPU run under train.shard=fsdp (a pure function of its arguments).
    quant = quantization_config(ModelConfig(quantization="nf4"), torch.device("cuda", 0), torch.bfloat16, "fsdp")
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": "cpu"})
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    body, head = decoder_and_head(model)
    step_loss = StepLoss(body, head, cpu, torch.bfloat16, 16)
    packed = next(m for m in body.modules() if type(m).__name__ == "Linear4bit").weight
    seen = {"full_rows": int(packed.shape[0]), "dtype": str(packed.dtype)}
    phase, table_gathers = ["setup"], []
    if ranks.world > 1:
        layers = sharding.decoder_layers(body)
        embedding = sharding.input_embedding(body, step_loss)
        sharding.shard(step_loss, layers, cpu, ranks, embedding)
        shard_of = next(m for m in body.modules() if type(m).__name__ == "Linear4bit").weight
        seen.update(kind=type(shard_of).__name__, local_rows=int(shard_of.to_local().shape[0]),
                    embedding_unit=type(embedding).__name__ if embedding is not None else None)
        # Which pass gathers the table: FSDP2's public set_custom_all_gather with its default collective, counted.
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        class Counted(DefaultAllGather):
            def __call__(self, *args, **kwargs):
                table_gathers.append(phase[0])
                return super().__call__(*args, **kwargs)

        embedding.set_custom_all_gather(Counted())
    seen["table_gathers"] = table_gathers
    model.train()
    rows = [torch.arange(3, 3 + 24).remainder(base.config.vocab_size), torch.arange(40, 58)]
    label_total = sum(len(r) - 1 for r in rows)
    loss_sum = torch.zeros(())
    mine = rows if ranks.world == 1 else [rows[ranks.rank]]
    for ids in mine:
        targets = torch.cat([ids[1:], torch.tensor([IGNORE])])
        mb = MicroBatch(ids[None], targets[None], torch.arange(len(ids))[None], None, len(ids), len(ids) - 1, 1)
        phase[0] = "forward"
        loss = step_loss(mb)
        phase[0] = "backward"
        (loss / label_total).backward()
        loss_sum += loss.detach()
    dist.all_reduce_step([], loss_sum, ranks)
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.float().flatten().tolist()
    if ranks.main:
        with open(out, "w") as f:
            json.dump({"loss_sum": float(loss_sum), "grads": grads, "weight": seen}, f)
    dist.shutdown(ranks)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
