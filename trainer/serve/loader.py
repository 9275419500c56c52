"""The model loader `samebox serve` hands transformers serve (5.25 on), whose model loads in a spawned process.

transformers pickles the server's loader into that process, so this class lives at a module's top level, where the
spawned process can import it. It loads as transformers does (base + adapter from the overlay directory, through
peft) and then merges the LoRA into the weights there, where they are.
"""

from __future__ import annotations

from transformers.cli.serving.model_manager import ModelLoader

from trainer.model.load import hide_bitsandbytes
from trainer.serve.served import loaded_line, merge_lora


class MergingLoader(ModelLoader):
    describe = ""  # what the served model is, set by `samebox serve` for the line printed once it has loaded

    def _load_model(self, *args, **kwargs):
        hide_bitsandbytes()  # the served weights are never quantized by bitsandbytes
        model = super()._load_model(*args, **kwargs)
        merged = merge_lora(model)
        print(loaded_line(self.describe, model, merged), flush=True)
        return model
