"""Are packed samples kept apart? The attention kernel must not let a sample see the one packed before it.

Hidden states of samples packed into one row by the trainer's own collation (flash-attn varlen boundaries, or
position ids restarting per sample, which transformers turns into a block-diagonal mask for SDPA) are compared with
each sample run alone; the same row run without sample bounds gives the size of a leak, for scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.data.batching import collate_packed
from trainer.data.dataset import IGNORE, TokenizedData
from trainer.model.load import flash_attn_usable


def packing_isolation(model_dir: Path | str, samples: list[list[int]], dtype: torch.dtype = torch.bfloat16) -> dict:
    """Relative differences of the packed and of the unbounded row's hidden states from the samples run alone."""
    from transformers import AutoModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = "flash_attention_2" if flash_attn_usable(device) else "sdpa"
    model = AutoModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention).to(device)
    tokenized = TokenizedData(samples, [[IGNORE] * len(s) for s in samples])

    @torch.no_grad()
    def hidden(**inputs) -> torch.Tensor:
        return model(**inputs, use_cache=False).last_hidden_state[0].float()

    everything = list(range(len(samples)))
    packed = hidden(**collate_packed(tokenized, everything, attention == "flash_attention_2").model_inputs(device))
    alone = torch.cat([hidden(**collate_packed(tokenized, [i], False).model_inputs(device)) for i in everything])
    flat = torch.tensor([[t for s in samples for t in s]], device=device)
    unbounded = hidden(input_ids=flat, position_ids=torch.arange(flat.shape[1], device=device)[None])
    return {"attention": attention, "samples": len(samples), "tokens": int(flat.shape[1]),
            "packed_vs_alone_rel_diff": float((packed - alone).norm() / alone.norm()),
            "unbounded_vs_alone_rel_diff": float((unbounded - alone).norm() / alone.norm())}
