"""The training config: nested dataclasses loaded from YAML plus ``section.key=value`` overrides, validated at once.

Stages: parse (YAML -> dict, overrides applied) -> build (unknown keys are errors naming the valid ones) ->
validate (every problem collected and reported together, each with what would work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from builder.errors import SameboxError


@dataclass
class ModelConfig:
    name: str = ""  # local dir, hub id (HF_ENDPOINT honoured) or modelscope://org/name
    source: str = "auto"  # auto | local | hub | modelscope
    revision: str | None = None
    quantization: str = "none"  # nf4 (QLoRA, needs bitsandbytes + CUDA) | none
    dtype: str = "bf16"  # bf16 | fp16 | fp32: the frozen weights' dtype and the compute dtype
    attention: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    gradient_checkpointing: str = "auto"  # auto | true | false
    trust_remote_code: bool = False


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | str = "all-linear"


@dataclass
class DataConfig:
    path: str = ""
    format: str = "auto"  # auto | alpaca | messages | prompt_completion
    max_length: int = 2048
    train_on_prompt: bool = False
    packing: str = "auto"  # auto (with flash-attn varlen) | true | false (length-bucketed padded batches)
    shuffle: bool = True
    cache_dir: str | None = None  # default: $SAMEBOX_CACHE or ~/.cache/samebox/tokenized


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None
    samples_per_step: int = 16  # samples per optimizer step, over all GPUs
    micro_batch_tokens: int = 16384  # token budget of one forward/backward (padding included)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    loss_chunk_tokens: int = 1024  # logits are computed this many tokens at a time, never for the whole batch


@dataclass
class OutputConfig:
    dir: str = "runs/samebox"
    save_every_steps: int = 200
    save_every_minutes: float = 30.0
    keep_last: int = 3
    log_every_steps: int = 1
    tensorboard: str = "auto"  # auto (on when tensorboard is installed) | true | false
    tensorboard_dir: str | None = None  # default: /root/tf-logs/<run> on AutoDL, else <dir>/tensorboard
    wandb_project: str | None = None  # set to log to wandb (imported only then)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.source": ("auto", "local", "hub", "modelscope"),
    "model.quantization": ("nf4", "none"),
    "model.dtype": ("bf16", "fp16", "fp32"),
    "model.attention": ("auto", "flash_attention_2", "sdpa", "eager"),
    "model.gradient_checkpointing": ("auto", "true", "false"),
    "data.format": ("auto", "alpaca", "messages", "prompt_completion"),
    "data.packing": ("auto", "true", "false"),
    "output.tensorboard": ("auto", "true", "false"),
}
POSITIVE = ("lora.r", "lora.alpha", "data.max_length", "train.epochs", "train.samples_per_step",
            "train.micro_batch_tokens", "train.lr", "train.loss_chunk_tokens", "output.save_every_steps",
            "output.keep_last", "output.log_every_steps", "output.save_every_minutes")


def parse_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """YAML file (optional) -> dict, with ``section.key=value`` overrides (values parsed as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SameboxError(f"config file not found: {path}", hint="pass a YAML file such as configs/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SameboxError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SameboxError(f"{path}: expected a mapping of sections (model:, data:, ...)")
        raw = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise SameboxError(f"override {item!r} is not section.key=value", hint="e.g. train.lr=1e-4")
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise SameboxError(f"override {item!r}: {parts[0]} is not a section")
        section[parts[1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """dict -> TrainConfig; unknown sections or keys are errors that name the valid ones."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    valid_sections = {f.name: f for f in fields(TrainConfig)}
    for name, body in raw.items():
        if name not in valid_sections:
            problems.append(f"unknown section {name!r}; valid sections: {', '.join(valid_sections)}")
            continue
        cls = valid_sections[name].default_factory  # type: ignore[misc]
        if not isinstance(body, dict):
            problems.append(f"section {name!r} must be a mapping")
            continue
        valid_keys = [f.name for f in fields(cls)]
        unknown = sorted(set(body) - set(valid_keys))
        for key in unknown:
            problems.append(f"unknown key {name}.{key}; valid keys in {name}: {', '.join(valid_keys)}")
        hints = get_type_hints(cls)
        sections[name] = cls(**{k: _coerce(v, hints[k]) for k, v in body.items() if k in valid_keys})
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return TrainConfig(**sections)


def _coerce(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads 2e-4 (no dot) as a string; a float field takes it as the number it means."""
    if isinstance(value, str) and float in getattr(hint, "__args__", (hint,)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _get(cfg: TrainConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _normalise(cfg: TrainConfig) -> None:
    """YAML turns true/false into bools; the tri-state keys keep them as strings."""
    for dotted in CHOICES:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, bool):
            setattr(getattr(cfg, section), key, "true" if value else "false")
    if isinstance(cfg.lora.targets, str) and cfg.lora.targets != "all-linear":
        cfg.lora.targets = [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Collect every problem; raise one SameboxError listing them all."""
    _normalise(cfg)
    problems: list[str] = []
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            problems.append(f"{dotted}={value!r}; choose one of {', '.join(choices)}")
    for dotted in POSITIVE:
        value = _get(cfg, dotted)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{dotted}={value!r} must be a positive number")
    if not cfg.model.name:
        problems.append("model.name is empty; give a local directory, a hub id (Qwen/Qwen2.5-7B) or modelscope://id")
    if not cfg.data.path:
        problems.append("data.path is empty; give a JSONL file (alpaca, messages or prompt/completion rows)")
    if cfg.train.max_steps is not None and (not isinstance(cfg.train.max_steps, int) or cfg.train.max_steps <= 0):
        problems.append(f"train.max_steps={cfg.train.max_steps!r} must be a positive integer or null")
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout={cfg.lora.dropout!r} must be in [0, 1)")
    if not 0 <= cfg.train.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio={cfg.train.warmup_ratio!r} must be in [0, 1)")
    if not isinstance(cfg.lora.targets, (list, str)) or not cfg.lora.targets:
        problems.append("lora.targets must be 'all-linear' or a list of module names such as [q_proj, v_proj]")
    if cfg.model.quantization == "nf4" and cfg.model.dtype == "fp32":
        problems.append("model.quantization=nf4 computes in bf16 or fp16; set model.dtype=bf16")
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return cfg


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return validate_config(build_config(parse_config(path, overrides)))
