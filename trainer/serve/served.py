"""What `samebox serve` and `samebox export` are pointed at: a run directory or a model, plus a LoRA adapter.

``resolve_model`` turns RUN_DIR|MODEL [--adapter DIR] into a ``ServedModel`` (the base model's local directory, the
adapter, a name) and checks, before any weights load, that the adapter fits the base: every LoRA matrix must sit
on a module of the base with the shapes it was trained on. ``overlay_dir`` lays out base and adapter as one model
directory of symlinks, which transformers loads as base + adapter (its PEFT integration) without copying weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import SameboxError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_CONFIG = "config.yaml"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class ServedModel:
    """A base model's local directory and, optionally, a LoRA adapter trained on it."""

    name: str  # what clients ask for (`model` in a request), what Modelfiles and logs call it
    base_dir: Path
    adapter_dir: Path | None = None
    run_dir: Path | None = None
    trust_remote_code: bool = False

    def describe(self) -> str:
        if self.adapter_dir is None:
            return f"{self.name}: {self.base_dir} (no adapter)"
        return f"{self.name}: {self.base_dir} + LoRA adapter {self.adapter_dir}"


def resolve_model(target: str, adapter: str | None = None, name: str | None = None) -> ServedModel:
    """RUN_DIR (a `samebox train` output dir: its config.yaml names the base, its adapter/ is the adapter) or MODEL
    (a local directory, a hub id or modelscope://id), with ``adapter`` overriding the run's own."""
    path = Path(target).expanduser()
    if (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file():
        return _from_run_dir(path, adapter, name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise SameboxError(f"{path} is neither a `samebox train` run directory (no {RUN_CONFIG}) nor a model "
                           "directory (no config.json)",
                           "pass the output.dir of a finished `samebox train` run, or a model saved with "
                           "save_pretrained (or a hub id such as Qwen/Qwen2.5-1.5B-Instruct)")
    if not path.exists():
        base = _hub_model_dir(target, path)
    else:
        from trainer.config import ModelConfig

        base = local_model_dir(ModelConfig(name=target))
    adapter_dir = _adapter_dir(Path(adapter).expanduser(), "--adapter") if adapter else None
    served = ServedModel(_name(name, Path(target).name), base, adapter_dir)
    check_adapter_fits(served)
    return served


WHAT_WORKS = ("pass the output.dir of a `samebox train` run (it holds config.yaml and adapter/), a model directory "
              "(config.json and the weights), or a hub id such as Qwen/Qwen2.5-1.5B-Instruct")


def _hub_model_dir(target: str, path: Path) -> Path:
    """A target that is no path here: a hub id (org/name) is fetched; anything else is a run or model directory
    that does not exist, said so with the absolute path tried and the runs beside it."""
    from trainer.config import ModelConfig
    from trainer.model.hub import MIRROR

    missing = f"{target}: no such run directory or model directory ({path.absolute()} does not exist)"
    if target.startswith(("/", ".", "~")) or target.count("/") != 1 or path.parent.is_dir():
        runs = [str(Path(target).parent / found.parent.name)
                for found in sorted(path.parent.glob(f"*/{RUN_CONFIG}"))] if path.parent.is_dir() else []
        raise SameboxError(missing, WHAT_WORKS + (f"; runs beside it: {', '.join(runs[:10])}" if runs else ""))
    try:
        return local_model_dir(ModelConfig(name=target))
    except SameboxError as e:
        why = e.message.removeprefix(f"model.name={target!r} is a hub id, but ")
        raise SameboxError(f"{missing}, and as a hub id it cannot be fetched: {why}",
                           f"{WHAT_WORKS}; a hub id needs the hub reachable (HF_ENDPOINT={MIRROR} where "
                           "huggingface.co is not) or the model in the local cache") from None


def _from_run_dir(run_dir: Path, adapter: str | None, name: str | None) -> ServedModel:
    from trainer.config import build_config, parse_config

    cfg = build_config(parse_config(run_dir / RUN_CONFIG)).model
    if adapter:
        adapter_dir = _adapter_dir(Path(adapter).expanduser(), "--adapter")
    elif (run_dir / "adapter" / ADAPTER_CONFIG).is_file():
        adapter_dir = _adapter_dir(run_dir / "adapter", "the run's adapter")
    else:
        checkpoints = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: p.stat().st_mtime)
        hint = (f"the run has not finished; serve its newest checkpoint: --adapter {checkpoints[-1]}" if checkpoints
                else f"finish the run first (samebox train {run_dir / RUN_CONFIG} --resume auto)")
        raise SameboxError(f"{run_dir} has no adapter ({run_dir / 'adapter'} is missing)", hint)
    served = ServedModel(_name(name, run_dir.resolve().name), local_model_dir(cfg), adapter_dir, run_dir,
                         cfg.trust_remote_code)
    check_adapter_fits(served)
    return served


def _name(given: str | None, fallback: str) -> str:
    name = given or re.sub(r"[^A-Za-z0-9._-]+", "-", fallback).strip("-.") or "model"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SameboxError(f"--name {name!r} is not a usable model name",
                           "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def _adapter_dir(path: Path, what: str) -> Path:
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise SameboxError(f"{what} {path} is not a LoRA adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                           "pass a run's adapter/ directory or one of its checkpoints/step-N directories")
    return path.resolve()


def local_model_dir(cfg) -> Path:  # cfg: trainer.config.ModelConfig
    """The base model as a local directory: a local path as is, a ModelScope id through its client, a hub id from
    the Hugging Face cache or downloaded (HF_ENDPOINT honoured; an unreachable hub exits 2 in seconds)."""
    from trainer.model.hub import resolve_source
    from trainer.model.load import fetch_model

    source, name = resolve_source(cfg)
    if source != "hub":
        return Path(fetch_model(cfg)).resolve()
    from huggingface_hub import snapshot_download

    from trainer.model.hub import check_model_source

    check_model_source(cfg)
    return Path(snapshot_download(name, revision=cfg.revision)).resolve()


def adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SameboxError(f"cannot read {adapter_dir / ADAPTER_CONFIG}: {e}",
                           "pass an adapter directory written by `samebox train` (or peft's save_pretrained)") from None


def check_adapter_fits(served: ServedModel) -> None:
    """Every LoRA pair of the adapter lands on a linear module of the base with matching in/out features. The base
    is built on the meta device (no weights read), so a mismatch costs a second, not a model load."""
    if served.adapter_dir is None:
        return
    config = adapter_config(served.adapter_dir)
    trained_on = config.get("base_model_name_or_path") or "(not recorded)"
    if config.get("peft_type", "LORA") != "LORA":
        raise SameboxError(f"{served.adapter_dir} is a {config.get('peft_type')} adapter; serve and export take LoRA",
                           "pass a LoRA adapter (what `samebox train` writes)")
    shapes = _adapter_shapes(served.adapter_dir / ADAPTER_WEIGHTS)
    modules = _linear_shapes(served.base_dir, served.trust_remote_code)
    problems = []
    for key, shape in sorted(shapes.items()):
        found = _LORA_KEY.match(key)
        if found is None:
            continue
        module, ab = found["module"], found["ab"]
        if module not in modules:
            problems.append(f"{module}: no such linear module in {served.base_dir.name}")
        elif ab == "A" and shape[1] != modules[module][0]:
            problems.append(f"{module}: the adapter takes {shape[1]} inputs, the base {modules[module][0]}")
        elif ab == "B" and shape[0] != modules[module][1]:
            problems.append(f"{module}: the adapter gives {shape[0]} outputs, the base {modules[module][1]}")
    if problems:
        more = [f"... and {len(problems) - 5} more"] if len(problems) > 5 else []
        raise SameboxError(f"the adapter {served.adapter_dir} does not fit the base model {served.base_dir}",
                           f"serve the base it was trained on: {trained_on}", problems[:5] + more)


def _adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise SameboxError(f"cannot read the adapter weights {path}: {e}",
                           "the file is damaged or not safetensors; use a checkpoint from checkpoints/") from None


def _linear_shapes(base_dir: Path, trust_remote_code: bool) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every nn.Linear, from the config alone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def overlay_dir(served: ServedModel, parent: Path) -> Path:
    """parent/<name>/: symlinks to the base model's files and the adapter's. transformers loads such a directory
    (config.json beside adapter_config.json) as base weights from it plus the adapter through peft."""
    out = Path(parent) / served.name
    out.mkdir(parents=True)
    for item in sorted(served.base_dir.iterdir()):
        if not item.name.startswith(("adapter_", ".")):
            os.symlink(item, out / item.name)
    if served.adapter_dir is not None:
        for item in (served.adapter_dir / ADAPTER_CONFIG, served.adapter_dir / ADAPTER_WEIGHTS):
            os.symlink(item, out / item.name)
    return out


def loaded_line(describe: str, model, merged: int) -> str:
    """What `samebox serve` prints once the weights are in place (``describe``: ServedModel.describe())."""
    lora = f" (LoRA merged into the weights in memory: {merged} layers)" if merged else ""
    weights = next(model.parameters())
    return (f"samebox serve: {describe}{lora}, {str(weights.dtype).removeprefix('torch.')} on "
            f"{weights.device}")


def merge_lora(model) -> int:
    """Fold every LoRA pair into its base weight and put the plain layer back in its place (as peft's
    merge_and_unload does): after this a token costs what it costs on the base model. The number of layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return len(layers)
