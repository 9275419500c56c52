"""The run's data, checked against the model's tokenizer before any weights load."""

from __future__ import annotations

from trainer.config import TrainConfig
from trainer.data.dataset import TokenizedData, load_dataset
from trainer.model.load import checked_tokenizer


def prepare_data(cfg: TrainConfig) -> tuple[TokenizedData, str]:
    """The run's tokenized data and a line describing it: file, rows and tokenizer checked before the weights."""
    data, cached = load_dataset(cfg.data, checked_tokenizer(cfg.model))
    note = f"{len(data)} samples ({'cached' if cached else 'tokenized'}, {data.truncated} truncated to " \
           f"{cfg.data.max_length}"
    if data.unlabeled:
        note += f"; {data.unlabeled} with no token left to train after truncation"
    return data, note + ")"
