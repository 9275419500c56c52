"""What a model's attention needs from the kernels, read from its Hugging Face config.json: head dim, dtype,
and the optional flash-attn features (sliding window -> 'local', logit soft-capping -> 'softcap', a head dim
flash-attn pads -> 'uneven_k')."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core import compat
from builder.core.errors import SameboxError

DEFAULT_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class AttentionNeeds:
    """The attention shapes and features the self-test must exercise for one model (or the defaults)."""

    source: str
    head_dims: tuple[int, ...] = DEFAULT_HEAD_DIMS
    dtype: str = "bfloat16"
    window: int | None = None
    features: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "head_dims": list(self.head_dims),
            "dtype": self.dtype,
            "window": self.window,
            "features": list(self.features),
        }


def _config_path(config_or_dir: str) -> Path:
    path = Path(config_or_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SameboxError(
            f"--model {config_or_dir}: no config.json there",
            "pass a Hugging Face model directory or its config.json",
        )
    return path


def attention_needs_from_config(cfg: dict[str, Any], source: str) -> AttentionNeeds:
    """Pure: a config dict -> AttentionNeeds. Multimodal configs keep the language model under text_config."""
    cfg = {**cfg, **cfg.get("text_config", {})}
    head_dim = cfg.get("head_dim")
    if not head_dim:
        if not cfg.get("hidden_size") or not cfg.get("num_attention_heads"):
            raise SameboxError(
                f"{source}: config has neither head_dim nor hidden_size/num_attention_heads",
                "pass the config.json of a decoder model (Llama, Qwen, Mistral, Gemma ...)",
            )
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    window = cfg.get("sliding_window")
    # Qwen2-style configs carry a sliding_window value but switch it off with use_sliding_window = false.
    if cfg.get("use_sliding_window") is False:
        window = None
    features = []
    if window:
        features.append("local")
    if cfg.get("attn_logit_softcapping"):
        features.append("softcap")
    if not compat.flash_attn_head_dim_even(int(head_dim)):
        features.append("uneven_k")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    if dtype not in ("bfloat16", "float16"):
        dtype = "bfloat16"  # flash-attn runs only half types; fp32 checkpoints train in bf16
    return AttentionNeeds(source, (int(head_dim),), dtype, int(window) if window else None, tuple(features))


def attention_needs(config_or_dir: str | None) -> AttentionNeeds:
    if config_or_dir is None:
        return AttentionNeeds("default")
    path = _config_path(config_or_dir)
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SameboxError(f"{path}: not valid JSON ({e})", "pass a Hugging Face config.json") from e
    return attention_needs_from_config(cfg, str(path))
