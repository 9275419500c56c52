"""The training config: one typed schema (nested dataclasses whose fields carry a ``Rule``), loaded from YAML plus
``section.key=value`` overrides.

Stages: parse (YAML -> dict, overrides applied) -> build (unknown keys, and every value against its field's rule:
type, range or choices) -> validate (settings that conflict with each other). Each stage collects every problem, and
``load_config`` reports those of all three together, each naming the field and what would work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from builder.core.errors import SameboxError
from builder.core.settings import AUTODL_DATA_DISK
from trainer.data.formats import FORMATS


@dataclass(frozen=True)
class Rule:
    """What one field accepts. ``kind``: int, float, bool, str, choice or targets; ``low``/``high`` bound a
    number (``open_low``/``open_high``: the bound itself is excluded); ``words`` are strings an int field also
    takes ('auto'); ``nullable``: null means "not set"."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    nullable: bool = False
    required: str = ""  # for a str field that must be given: what to give

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "targets":
            text = "all-linear or a list of module names such as [q_proj, v_proj]"
        elif self.kind == "str":
            text = self.required or "a non-empty string"
        else:
            text = ("an integer" if self.kind == "int" else "a number") + self._range()
            if self.words:
                text += " or " + " or ".join(self.words)
        return text + (" (or null)" if self.nullable else "")

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f" {'>' if self.open_low else '>='} {_num(self.low)}"
        return ""

    def in_range(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def check(self, value: Any) -> tuple[Any, bool]:
        """(the value as the trainer uses it, whether it is acceptable)."""
        if value is None:
            return None, self.nullable
        if self.kind == "bool":
            return value, isinstance(value, bool)
        if self.kind == "choice":
            if isinstance(value, bool):  # YAML reads true/false as booleans; the tri-state keys keep words
                value = "true" if value else "false"
            return value, value in self.choices
        if self.kind == "targets":
            if isinstance(value, str) and value != "all-linear":
                value = [t.strip() for t in value.split(",") if t.strip()]
            if isinstance(value, str):
                return value, True
            ok = isinstance(value, list) and bool(value) and all(isinstance(t, str) and t for t in value)
            return value, ok
        if self.kind == "str":
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a revision of digits, unquoted
            return value, isinstance(value, str) and bool(value.strip())
        if isinstance(value, str) and value in self.words:
            return value, True
        number = _as_number(value)
        if number is None:
            return value, False
        if self.kind == "int":
            if not number.is_integer():
                return value, False
            number = int(number)
        return number, self.in_range(number)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _as_number(value: Any) -> float | None:
    """YAML 1.1 reads 2e-4 (no dot) as a string: a number field takes it as the number it means."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _field(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


def integer(default: int | None, low: int = 1, nullable: bool = False, words: tuple[str, ...] = ()) -> Any:
    return _field(default, Rule("int", low=low, nullable=nullable, words=words))


def number(default: float, low: float = 0.0, high: float | None = None, open_low: bool = False,
           open_high: bool = False) -> Any:
    return _field(default, Rule("float", low=low, high=high, open_low=open_low, open_high=open_high))


def choice(default: str, *choices: str) -> Any:
    return _field(default, Rule("choice", choices=choices))


def flag(default: bool) -> Any:
    return _field(default, Rule("bool"))


def text(default: str | None, required: str = "") -> Any:
    return _field(default, Rule("str", nullable=default is None, required=required))


TRI_STATE = ("auto", "true", "false")


@dataclass
class ModelConfig:
    # local dir, hub id (HF_ENDPOINT honoured) or modelscope://org/name
    name: str = text("", "a local directory, a hub id (Qwen/Qwen2.5-7B) or modelscope://id")
    source: str = choice("auto", "auto", "local", "hub", "modelscope")
    revision: str | None = text(None)
    quantization: str = choice("none", "nf4", "none")  # nf4 (QLoRA, needs bitsandbytes + CUDA) | none
    dtype: str = choice("bf16", "bf16", "fp16", "fp32")  # the frozen weights' dtype and the compute dtype
    attention: str = choice("auto", "auto", "flash_attention_2", "sdpa", "eager")
    gradient_checkpointing: str = choice("auto", *TRI_STATE)
    trust_remote_code: bool = flag(False)


@dataclass
class LoraSection:
    r: int = integer(16)
    alpha: int = integer(32)
    dropout: float = number(0.05, 0.0, 1.0, open_high=True)
    targets: list[str] | str = _field("all-linear", Rule("targets"))


@dataclass
class DataConfig:
    path: str = text("", f"a JSONL file ({', '.join(FORMATS)} rows)")
    format: str = choice("auto", "auto", *FORMATS)  # trainer/data/formats.py
    max_length: int = integer(2048, low=2)  # a sample needs a token to predict from and one to predict
    train_on_prompt: bool = flag(False)
    packing: str = choice("auto", *TRI_STATE)  # auto (with flash-attn varlen) | true | false (padded buckets)
    shuffle: bool = flag(True)
    cache_dir: str | None = text(None)  # default: $SAMEBOX_CACHE or ~/.cache/samebox/tokenized


@dataclass
class TrainSection:
    epochs: int = integer(1)
    max_steps: int | None = integer(None, nullable=True)
    samples_per_step: int = integer(16)  # samples per optimizer step, over all GPUs
    # Token budget of one forward/backward (padding included); auto: chosen from the GPU's free memory.
    micro_batch_tokens: int | str = integer(16384, words=("auto",))
    lr: float = number(2e-4, open_low=True)
    weight_decay: float = number(0.0)
    warmup_ratio: float = number(0.03, 0.0, 1.0, open_high=True)
    min_lr_ratio: float = number(0.0, 0.0, 1.0)
    max_grad_norm: float = number(1.0, open_low=True)
    seed: int = integer(42, low=0)
    # Logits are computed this many tokens at a time, never for the whole batch; auto: ~160 MiB of fp32 logits a
    # chunk (a 152k vocabulary: 256 tokens), so the loss never sets the peak memory.
    loss_chunk_tokens: int | str = integer("auto", words=("auto",))  # type: ignore[arg-type]
    fused: str = choice("auto", *TRI_STATE)  # fused LoRA/NF4 kernels
    offload_activations: str = choice("auto", *TRI_STATE)  # checkpointed activations kept in host memory
    # fsdp: FSDP2 shards the frozen weights and the LoRA state over the processes (torchrun), for a model whose
    # weights do not fit one card; none: every process holds the whole model
    shard: str = choice("none", "none", "fsdp")


@dataclass
class OutputConfig:
    dir: str = text("runs/samebox", f"a directory for checkpoints and metrics (AutoDL: under {AUTODL_DATA_DISK})")
    save_every_steps: int = integer(200)
    save_every_minutes: float = number(30.0, open_low=True)
    keep_last: int = integer(3)
    log_every_steps: int = integer(1)
    tensorboard: str = choice("auto", *TRI_STATE)  # auto: on when tensorboard is installed
    tensorboard_dir: str | None = text(None)  # default: /root/tf-logs/<run> on AutoDL, else <dir>/tensorboard
    wandb_project: str | None = text(None)  # set to log to wandb (imported only then)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(TrainConfig)}  # type: ignore[misc]


def schema() -> dict[str, tuple[Rule, Any]]:
    """Every field as ``section.key`` -> (its rule, its default), in config order."""
    return {f"{name}.{f.name}": (f.metadata["rule"], f.default) for name, cls in SECTIONS.items()
            for f in fields(cls)}


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def field_problem(dotted: str, value: Any, rule: Rule, default: Any) -> str:
    """One field's problem: its name, the value given, what it takes and its default."""
    shown = f"{value!r}" if isinstance(value, str) else _yaml(value)
    hint = f"default {_yaml(default)}" if default not in ("", None) else ""
    return f"{dotted}={shown}: expected {rule.describe()}" + (f" ({hint})" if hint else "")


def parse_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """YAML file (optional) -> dict, with ``section.key=value`` overrides (values parsed as YAML scalars)."""
    raw, problems = _parse(path, overrides)
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return raw


def _parse(path: Path | None, overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """The dict and every override that could not be applied. A file that cannot be read as a YAML mapping is
    raised at once: nothing else can be checked without it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SameboxError(f"config file not found: {path}", hint="pass a YAML file such as configs/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SameboxError(f"{path}: not UTF-8 text (byte {e.start})", hint="save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise SameboxError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SameboxError(f"{path}: expected a mapping of sections (model:, data:, ...)")
        raw = loaded or {}
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r} is not section.key=value (e.g. train.lr=1e-4)")
            continue
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            problems.append(f"override {item!r}: {parts[0]} is not a section")
            continue
        try:
            section[parts[1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            section[parts[1]] = value  # not a YAML scalar: the field's rule judges the text as given
    return raw, problems


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """dict -> TrainConfig: unknown sections or keys name the valid ones; every value is checked by its rule."""
    cfg, problems, _bad = _build(raw)
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return cfg


def _build(raw: dict[str, Any]) -> tuple[TrainConfig, list[str], set[str]]:
    """(the config with every bad value left at its default, the problems, the fields whose value was bad)."""
    problems: list[str] = []
    bad: set[str] = set()
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            problems.append(f"unknown section {name!r}; valid sections: {', '.join(SECTIONS)}")
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            problems.append(f"section {name!r} must be a mapping of its keys, e.g. {name}: {{key: value}}")
            bad.update(f"{name}.{f.name}" for f in fields(SECTIONS[name]))
            continue
        specs = {f.name: f for f in fields(SECTIONS[name])}
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key not in specs:
                problems.append(f"unknown key {name}.{key}; valid keys in {name}: {', '.join(specs)}")
                continue
            rule = specs[key].metadata["rule"]
            value, ok = rule.check(value)
            if ok:
                values[key] = value
            else:
                problems.append(field_problem(f"{name}.{key}", body[key], rule, specs[key].default))
                bad.add(f"{name}.{key}")
        sections[name] = SECTIONS[name](**values)
    return TrainConfig(**sections), problems, bad


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """What no single field says: required fields given, and settings that conflict. Every problem at once."""
    problems = _conflicts(cfg)
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return cfg


def _conflicts(cfg: TrainConfig, bad: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Required fields left empty and settings that conflict; none that involves a field in ``bad`` (its value
    was already reported, and the default standing in for it is not what the user chose)."""
    found: list[tuple[tuple[str, ...], str]] = []
    for dotted, (rule, _default) in schema().items():
        section, key = dotted.split(".")
        if rule.required and not getattr(getattr(cfg, section), key):
            found.append(((dotted,), f"{dotted} is empty; give {rule.required}"))
    if cfg.model.quantization == "nf4" and cfg.model.dtype == "fp32":
        found.append((("model.quantization", "model.dtype"),
                      "model.quantization=nf4 computes in bf16 or fp16; set model.dtype=bf16"))
    if cfg.train.shard == "fsdp" and cfg.model.dtype == "fp16":
        found.append((("train.shard", "model.dtype"), "train.shard=fsdp trains in bf16 or fp32 (fp16's loss scaling "
                      "is not sharded); set model.dtype=bf16"))
    return [message for involved, message in found if not bad.intersection(involved)]


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Parse, build and validate, reporting the problems of all three stages together."""
    raw, problems = _parse(path, overrides)
    cfg, found, bad = _build(raw)
    problems += found + _conflicts(cfg, bad)
    if problems:
        raise SameboxError("invalid training config", problems=problems)
    return cfg
