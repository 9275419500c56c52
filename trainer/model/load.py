"""The model side of a run: find the weights, pick attention and precision, load (4-bit or not), add LoRA."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from builder.core import compat
from builder.core.errors import SameboxError
from builder.core.lazy_compile import compile_on_first_call
from trainer.config import ModelConfig
from trainer.model.hub import resolve_source
from trainer.model.loss import loss_chunk_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: Any  # the PEFT model
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    attention: str
    model_dir: str


def fetch_model(cfg: ModelConfig) -> str:
    """A local directory or a hub id that from_pretrained can load (the hub honours HF_ENDPOINT by itself)."""
    source, name = resolve_source(cfg)
    if source == "modelscope":
        if importlib.util.find_spec("modelscope") is None:
            raise SameboxError("model.source is ModelScope but the modelscope package is not installed",
                               hint="pip install modelscope, or use a hub id with HF_ENDPOINT=https://hf-mirror.com")
        from modelscope import snapshot_download

        return str(snapshot_download(name, revision=cfg.revision))
    if source == "hub":
        print(f"samebox: loading {name} from {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}", flush=True)
    return name


def hide_bitsandbytes(quantization: str = "none") -> None:
    """peft imports bitsandbytes wherever it is installed (at its own import, and again to wrap each layer), and
    bitsandbytes, on a machine without a CUDA GPU, spends seconds of its import looking for a CPU kernel on the hub
    and warns about it. A process that quantizes nothing hides it for good: an import of it fails, as if it were not
    installed, and nothing without NF4 needs it. Called before the first import of peft."""
    if quantization == "none" and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import fails, find_spec finds nothing


def import_libraries(cfg: ModelConfig) -> None:
    """The libraries the weights need (peft, transformers' model classes, bitsandbytes for NF4, the fused layers),
    imported now: seconds of CPU the command spends while the preflight self-test uses the GPU."""
    hide_bitsandbytes(cfg.quantization)
    with compile_on_first_call():  # bitsandbytes' import would otherwise import TorchInductor (seconds)
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        import trainer.fused  # noqa: F401

        if cfg.quantization == "nf4":
            import bitsandbytes  # noqa: F401


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def flash_attn_usable(device: torch.device) -> bool:
    """flash-attn's varlen kernels: importable and an Ampere-or-newer GPU."""
    if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return False
    return compat.flash_attn2_runs(*torch.cuda.get_device_capability(device))


def pick_attention(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attention == "auto":
        return "flash_attention_2" if flash_attn_usable(device) else "sdpa"
    if cfg.attention == "flash_attention_2" and not flash_attn_usable(device):
        raise SameboxError("model.attention=flash_attention_2 but flash-attn is not installed or the GPU is older "
                           "than sm80", hint="set model.attention=sdpa (or auto)")
    return cfg.attention


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    dtype = DTYPES[cfg.dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SameboxError(f"{torch.cuda.get_device_name(device)} has no bf16", hint="set model.dtype=fp16")
    return dtype


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, shard: str = "none") -> Any:
    if cfg.quantization == "none":
        return None
    if device.type != "cuda":
        raise SameboxError("model.quantization=nf4 (QLoRA) needs a CUDA GPU",
                           hint="set model.quantization=none to train bf16/fp32 LoRA on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SameboxError("model.quantization=nf4 needs bitsandbytes", hint="pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    # FSDP2 shards every parameter of a unit alike: stored as the compute dtype, the packed 4-bit weights split
    # along dim 0 like the bf16 ones (bitsandbytes restores each weight's quant state after the all-gather).
    storage = {"bnb_4bit_quant_storage": dtype} if shard == "fsdp" else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, **storage)


def load_tokenizer(model_dir: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def activation_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Rough activation memory kept for backward per token without checkpointing (attention + MLP)."""
    hidden, inter = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    return config.num_hidden_layers * (20 * hidden + 6 * inter) * torch.finfo(dtype).bits // 8


def checkpointed_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """With checkpointing: every layer's input kept, one layer's activations live during its recomputation."""
    per_layer = activation_bytes_per_token(config, dtype) // config.num_hidden_layers
    return config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8 + per_layer


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing: works with frozen inputs, no enable_input_require_grads needed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gpu_free_bytes(device: torch.device) -> tuple[int, int, float]:
    """(free bytes this process may still take, the card's total, the process's memory fraction). The fraction
    (torch.cuda.set_per_process_memory_fraction: a share of a card, or a bigger card made to act like a 24 GB one)
    caps what the allocator hands out, which cudaMemGetInfo knows nothing of. A torch without
    get_per_process_memory_fraction is taken to have no cap."""
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(get_fraction(device)) if get_fraction is not None else 1.0
    if fraction < 1.0:
        free = min(free, max(0, int(fraction * total) - torch.cuda.memory_reserved(device)))
    return free, total, fraction


def wants_checkpointing(cfg: ModelConfig, base: Any, device: torch.device, dtype: torch.dtype,
                        micro_batch_tokens: int | str) -> bool:
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "true"
    if device.type != "cuda":
        return False
    if micro_batch_tokens == "auto":
        return True  # the budget is then sized for checkpointed layers
    free, _, _ = gpu_free_bytes(device)
    return activation_bytes_per_token(base.config, dtype) * int(micro_batch_tokens) > 0.6 * free


def check_lora_targets(model: Any, targets: str | list[str]) -> None:
    """Every named target must match a module: peft only complains when none does, and silently trains fewer."""
    if isinstance(targets, str):
        return
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in adapted)]
    if missing:
        linear = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1]
                         for n, m in model.get_base_model().named_modules()
                         if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear4bit")
                         and ".lora_" not in n} - {"lm_head"})
        raise SameboxError(f"LoRA targets {missing} match no module of this model",
                           hint=f"its linear layers are {', '.join(linear)}; or use lora.targets=all-linear")


def auto_budget(config: Any, fused: Any, device: torch.device, dtype: torch.dtype, step_tokens: int,
                trainable: int, loss_chunk: int, gathered: int = 0) -> int:
    """micro_batch_tokens=auto: as many tokens per micro-batch as the GPU's free memory holds (the out-of-memory
    back-off still halves it), never more than a whole step's tokens. A 24 GB and an 80 GB card each use theirs.
    ``gathered``: bytes of weights that FSDP2 all-gathers for a while, beyond this rank's shards."""
    if device.type != "cuda":
        return min(step_tokens, 16384)
    free, _, _ = gpu_free_bytes(device)
    elem = torch.finfo(dtype).bits // 8
    # LoRA weights, grads and AdamW's two moments in fp32; the loss's fp32 logits and their bf16 copy for the
    # gradient, a chunk at a time (trainer/model/loss.py works in place).
    reserve = 16 * trainable + 6 * loss_chunk * config.vocab_size + 2 ** 30 + gathered
    if fused is not None:
        per_token, reserve = fused.bytes_per_token(), reserve + fused.fixed_bytes()
    else:
        per_token = checkpointed_bytes_per_token(config, dtype)
    per_token += 4 * config.hidden_size * elem  # the final hidden states and their gradient
    budget = int((0.85 * free - reserve) // per_token)
    return max(1024, min(step_tokens, budget // 256 * 256))


@contextmanager
def host_threads(loading_on_host: bool) -> Iterator[None]:
    """While a sharded run loads and quantizes its weights in host memory: this process's share of the cores.
    torchrun sets OMP_NUM_THREADS=1 where it is unset, which would quantize a 32B model on one core per process."""
    before = torch.get_num_threads()
    share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if loading_on_host and share > before:
        torch.set_num_threads(share)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# torch.OutOfMemoryError from torch 2.5; the catalog's older torch raises torch.cuda.OutOfMemoryError (its base).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def weights_do_not_fit(model_dir: str, cfg: ModelConfig, device: torch.device) -> SameboxError:
    """The base weights alone overflowed the GPU while loading: say what would hold them (QLoRA, then the model
    sharded over several GPUs, then a bigger card) instead of the allocator's traceback."""
    if device.type == "cuda":
        free, total, fraction = gpu_free_bytes(device)
        card = f"{torch.cuda.get_device_name(device)}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now"
        if fraction < 1.0:
            card += f"; this process is held to {fraction * total / 2**30:.1f} GiB of it"
        count = torch.cuda.device_count()
    else:
        card, count = str(device), 0
    ways = []
    if cfg.quantization == "none":
        ways.append("load it in 4 bits: model.quantization=nf4 (QLoRA)")
    gpus = max(2, count)
    ways.append(f"shard it over {gpus} GPUs: torchrun --nproc_per_node {gpus} -m builder train CONFIG.yaml "
                "train.shard=fsdp (configs/qwen2.5-32b-qlora-2x24gb.yaml is one)")
    ways.append("or rent a card with more memory (samebox check-gpu --gpu NAME says which image runs on it)")
    return SameboxError(f"the weights of {model_dir} ({cfg.quantization}) do not fit one GPU ({card})",
                        hint="; ".join(ways))


@dataclass
class TrainPath:
    """How the model trains: the fused layers or transformers + peft, and whether FSDP2 shards it."""

    fused: Any  # trainer.fused.FusedDecoder | None
    note: str
    checkpointing: bool
    sharded: bool = False  # train.shard=fsdp: loaded on the host, to be sharded by trainer/loop/sharding.py


def setup_model(cfg: ModelConfig, lora: Any, train: Any, step_tokens: int, packing_allowed: bool = True
                ) -> tuple[LoadedModel, TrainPath]:
    """Load the base model frozen, wrap it with LoRA and pick the training path (fused layers when the model fits
    them and packing is allowed). ``step_tokens``: the most tokens one optimizer step can hold.

    Under train.shard=fsdp the weights load into host memory (a rank never holds the whole model on its GPU) and
    stay there until trainer/loop/sharding.py moves each rank's shards to ``LoadedModel.device``."""
    hide_bitsandbytes(cfg.quantization)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.fused import fused_decoder, want_offload

    device = pick_device()
    dtype = pick_dtype(cfg, device)
    attention = pick_attention(cfg, device)
    sharded = train.shard == "fsdp"
    quant = quantization_config(cfg, device, dtype, train.shard)
    model_dir = fetch_model(cfg)
    tokenizer = load_tokenizer(model_dir, cfg)
    load_to = "cpu" if sharded else str(device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention, "revision": cfg.revision,
                              "trust_remote_code": cfg.trust_remote_code, "device_map": {"": load_to}}
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        with host_threads(sharded):
            base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as e:
        raise SameboxError(f"could not load model {model_dir}: {e}",
                           hint="check the path or id; behind the GFW set HF_ENDPOINT=https://hf-mirror.com") from None
    except OUT_OF_MEMORY:
        raise weights_do_not_fit(model_dir, cfg, device) from None
    base.config.use_cache = False
    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, peft_cfg)
    except ValueError as e:
        raise SameboxError(f"LoRA targets {targets} do not match the model: {e}",
                           hint="use lora.targets=all-linear or names such as [q_proj, v_proj]") from None
    check_lora_targets(model, targets)
    if sharded:
        # The fused decoder holds whole per-layer weights of its own; FSDP2 shards the modules transformers built.
        fused, note = None, "FSDP2-sharded transformers + peft layers (train.shard=fsdp)"
    else:
        elem = torch.finfo(dtype).bits // 8
        saved_per_token = 2 * base.config.num_hidden_layers * base.config.hidden_size * elem
        offload = want_offload(train.offload_activations, device, saved_per_token * step_tokens)
        fused_setting = train.fused if packing_allowed else "false"
        fused, note = fused_decoder(model, fused_setting, dtype, device, offload)
        if not packing_allowed and train.fused != "false":
            note = "transformers + peft layers (the fused layers need packed samples: data.packing is false)"
    checkpointing = False
    if fused is None:
        checkpointing = wants_checkpointing(cfg, base, device, dtype, train.micro_batch_tokens)
        if checkpointing:
            enable_checkpointing(base)
    loaded = LoadedModel(model, tokenizer, device, dtype, attention, model_dir)
    return loaded, TrainPath(fused, note, checkpointing or fused is not None, sharded)


def micro_batch_budget(train: Any, loaded: LoadedModel, path: TrainPath, step_tokens: int, gathered: int = 0) -> int:
    """train.micro_batch_tokens, or under auto the budget from the GPU's free memory, measured once the weights
    are where they train (under FSDP2: this rank's shards on its GPU)."""
    if train.micro_batch_tokens != "auto":
        return int(train.micro_batch_tokens)
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    config = loaded.model.get_base_model().config
    return auto_budget(config, path.fused, loaded.device, loaded.dtype, step_tokens, trainable,
                       loss_chunk_rows(train.loss_chunk_tokens, config.vocab_size), gathered)


def decoder_and_head(model: Any, fused: Any = None) -> tuple[Any, torch.nn.Module]:
    """The transformer body (hidden states out; the fused decoder when there is one) and the output projection
    of a PEFT-wrapped causal LM."""
    causal_lm = model.get_base_model()
    body = fused if fused is not None else getattr(causal_lm, causal_lm.base_model_prefix)
    return body, causal_lm.get_output_embeddings()


def checked_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer alone: the data is checked against it before any weights load. A hub id is first
    checked for reachability (trainer/model/hub.py), so an offline machine hears so in seconds."""
    from trainer.model.hub import check_model_source

    check_model_source(cfg)
    return load_tokenizer(fetch_model(cfg), cfg)
