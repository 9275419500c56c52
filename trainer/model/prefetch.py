"""The model's weight files, and the native libraries the command is about to map (torch's, the nvidia-* CUDA
libraries, Triton's, bitsandbytes', flash-attn's), read into the page cache by background threads from the moment the
command starts, so the seconds a cold disk needs (a new or cloned instance, a restart after the page cache went) pass
beside the data checks, the imports and the preflight instead of inside them and the load: an import maps a library
and faults its pages in a few at a time, a reader streams it whole. A file already in memory reads in a fraction of a
second; what would not fit in half of the memory available now is left out (the libraries first, then the weights),
and under torchrun only the node's first process reads. The imports and the load read the same files as they always
did: this only warms them."""

from __future__ import annotations

import os
from pathlib import Path

from builder.core.readahead import Prefetch, available_bytes, library_files, sized
from trainer.config import ModelConfig
from trainer.model.hub import cached_config, resolve_source

__all__ = ["Prefetch", "available_bytes", "library_files", "start_prefetch", "weight_files"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def weight_files(cfg: ModelConfig) -> list[Path]:
    """The weight files of a local model directory, or of a hub model already in the local cache (its snapshot
    directory); [] for a model that is not on disk yet (the download reads it anyway)."""
    try:
        source, name = resolve_source(cfg)
    except Exception:  # noqa: BLE001  # a bad model.name is reported by the load, with its hint
        return []
    if source == "local":
        folder = Path(name).expanduser()
    elif source == "hub":
        config = cached_config(name, cfg.revision)
        if config is None:
            return []
        folder = Path(config).parent
    else:
        return []
    safetensors = sorted(folder.glob(WEIGHT_PATTERNS[0]))
    found = safetensors or sorted(folder.glob(WEIGHT_PATTERNS[1]))
    return [p for p in found if p.is_file()]


def start_prefetch(cfg: ModelConfig, threads: int = 4, share: float = 0.5, available: int | None = None,
                   libraries: list[Path] | None = None) -> Prefetch | None:
    """Start reading the native libraries (``libraries``, else library_files()) and then ``cfg``'s weight files when
    both fit in ``share`` of the available memory; where they do not, the weights alone when they fit (the larger
    cold read), else the libraries alone when they do; None when nothing is read."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return None  # one reader per node: the other processes find the pages the first one read
    room = available_bytes() if available is None else available
    if room is None:
        return None
    libs, lib_bytes = sized(library_files() if libraries is None else libraries)
    weights, weight_bytes = sized(weight_files(cfg))
    fits = share * room
    if lib_bytes + weight_bytes > fits:  # not both: the weights (the larger cold read), else the libraries
        if weight_bytes and weight_bytes <= fits:
            libs, lib_bytes = [], 0
        else:
            weights, weight_bytes = [], 0
            if lib_bytes > fits:
                libs, lib_bytes = [], 0
    if not libs and not weights:
        return None
    return Prefetch(libs + weights, lib_bytes + weight_bytes, lib_bytes).start(threads)
