"""train.shard=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards the frozen weights, the LoRA weights, their
gradients and AdamW's state over the processes, for a model whose weights do not fit one card.

Units: each decoder layer, the input embeddings, then the root (trainer.loop.step.StepLoss: the final norm and lm_head,
whose weight the chunked loss reads). A unit's weights are all-gathered around its forward and its backward and freed
after; the rest of the time each rank holds 1/N of them. The embeddings are a unit of their own so that the whole
table (1.5 GB on Qwen2.5-32B) is gathered only while the token ids are looked up (frozen, they have no backward), not
held with the root from the first layer's forward to the last layer's backward. (Measured on two processes held to
16 GiB, before the backward prefetch of the table was turned off: the peak at their first micro-batch stayed at
15.3 GiB, so it is not what sets that peak.) Each rank's loss
is already divided by the whole step's label tokens (trainer/loop/step.py), so the gradients' reduce-scatter is set to a
plain sum (FSDP2 averages by default): the summed shards are the one-process gradient, as under the replicated
path's all-reduce (trainer/loop/distributed.py).

Checkpoints hold the whole adapter and the whole optimizer state, gathered to rank 0 by
torch.distributed.checkpoint.state_dict, in the files the replicated path writes (optimizer state keyed by the
trainable parameters' order, as ``optimizer.state_dict()`` keys it): a run resumes with either setting and any
number of processes.
"""

from __future__ import annotations

from typing import Any

import torch

from builder.core import compat
from builder.core.errors import SameboxError
from trainer.loop.distributed import Ranks

LAUNCH = "torchrun --nproc_per_node N -m builder train CONFIG.yaml"
# FSDP2's fully_shard is public in torch.distributed.fsdp from this release on (older catalog images train
# replicated only); torch.distributed.checkpoint.state_dict and DTensor are imported on use for the same reason.
FSDP2_MIN_TORCH = (2, 6)


def require_processes(shard: str, ranks: Ranks) -> None:
    """train.shard=fsdp splits the model over the launcher's processes: one process has nothing to split over."""
    if shard == "fsdp" and _torch_release() < FSDP2_MIN_TORCH:
        need = ".".join(map(str, FSDP2_MIN_TORCH))
        raise SameboxError(f"train.shard=fsdp needs torch >= {need} (FSDP2); this environment has {torch.__version__}",
                           hint=f"use a catalog image with torch >= {need} (samebox images), or set train.shard=none")
    if shard == "fsdp" and ranks.world == 1:
        raise SameboxError("train.shard=fsdp shards the model over several processes, but this is the only one",
                           hint=f"launch one process per GPU: {LAUNCH} ... (N GPUs); or set train.shard=none")


def _torch_release() -> tuple[int, int]:
    major, minor = compat.torch_minor(torch.__version__).split(".")
    return int(major), int(minor)


def decoder_layers(body: Any) -> list[torch.nn.Module]:
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not layers:
        raise SameboxError(f"train.shard=fsdp needs the model body's decoder layers (.layers); "
                           f"{type(body).__name__} has none", hint="set train.shard=none")
    return list(layers)


def _bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def input_embedding(body: Any, step_loss: torch.nn.Module) -> torch.nn.Module | None:
    """The body's token embedding table, to be a unit of its own; None where the body does not say which it is or
    where it is lm_head's weight too (tied: small Qwen2.5 and Llama models), which must stay in the root: one tensor
    cannot be in two units."""
    get = getattr(body, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, torch.nn.Module):
        return None
    head = {id(p) for p in step_loss.head.parameters()} if isinstance(getattr(step_loss, "head", None),
                                                                        torch.nn.Module) else set()
    return None if any(id(p) in head for p in embedding.parameters()) else embedding


def gathered_bytes(step_loss: torch.nn.Module, layers: list[torch.nn.Module],
                   embedding: torch.nn.Module | None = None) -> int:
    """GPU memory the all-gathers take beyond this rank's shards (call before sharding): the root unit whole (it stays
    gathered from its forward to its backward) and the larger of two layers (the one computing and the one
    prefetched) and the embedding table (gathered alone at the forward's start, before any activation exists)."""
    layer_bytes = [_bytes(layer.parameters()) for layer in layers]
    table = _bytes(embedding.parameters()) if embedding is not None else 0
    return _bytes(step_loss.parameters()) - sum(layer_bytes) - table + max(2 * max(layer_bytes), table)


def shard(step_loss: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device, ranks: Ranks,
          embedding: torch.nn.Module | None = None) -> None:
    """Make the FSDP2 units, moving this rank's shards from the host to ``device`` (the rank's GPU, or the CPU
    under gloo). The LoRA weights must already be every rank's same (broadcast from rank 0): each rank keeps its
    slice of what it holds. ``embedding`` (input_embedding()): a unit of its own; None leaves it in the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    units = [fully_shard(layer, mesh=mesh) for layer in layers]
    if embedding is not None:
        units.append(fully_shard(embedding, mesh=mesh))
        # FSDP2's default backward prefetch gathers the unit that ran before layer 0 in the forward (the table) when
        # layer 0's backward starts, and the frozen table, having no backward, stays whole to the end. Prefetching
        # layer 0 itself (already gathered: a no-op) replaces that default.
        units[0].set_modules_to_backward_prefetch([units[0]])
    units.append(fully_shard(step_loss, mesh=mesh))
    for unit in units:
        # divide factor 1 and SUM only (no PREMUL_SUM, which gloo lacks): the reduce-scatter sums the ranks' grads.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # bitsandbytes keeps a 4-bit weight's quant state (absmax, code) on the module, outside the parameters FSDP2
    # moves; it is a few percent of the weights and every rank needs all of it, next to the gathered weight.
    for module in step_loss.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            state.to(device)


def trainable_names(model: Any) -> list[str]:
    """The trainable parameters' names in ``model.parameters()`` order: the order the optimizer holds them."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole LoRA weights by parameter name, on rank 0's host ({} on the other ranks). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0 ({} elsewhere), keyed as ``optimizer.state_dict()`` keys it. Every rank
    calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(model))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in full["param_groups"]]}


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Rank 0's ``saved`` (a checkpoint's optimizer.pt; {} on the other ranks) into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full: dict[str, Any] = {}
    if saved:
        names = trainable_names(model)
        full = {"state": {names[i]: value for i, value in saved["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
