"""`samebox export`: merged weights give the logits of base + adapter; the merge is atomic; the GGUF file reads
back with llama.cpp's own reader (names, shapes, types, vocabulary, values); what cannot be converted exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.cli import main
from tests.serve.conftest import save_tiny_model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def probe_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 8, 99, 3, 120, 64]])


def reference(base_dir: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model.eval()


def test_merged_weights_give_the_logits_of_base_plus_adapter(tmp_path, run_dir, base_dir, probe_ids, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", str(out), "--dtype", "fp32"]) == 0
    assert f"samebox serve {out}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    want = logits(reference(base_dir, run_dir / "adapter"), probe_ids)
    assert torch.allclose(logits(merged, probe_ids), want, atol=1e-5)
    assert not torch.allclose(logits(reference(base_dir, None), probe_ids), want, atol=1e-2)  # the adapter matters
    assert not any("lora" in k for k in merged.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert json.loads((out / "samebox-export.json").read_text())["adapter"] == str(run_dir / "adapter")


def test_bf16_merge_is_bf16_and_close(tmp_path, run_dir, base_dir, probe_ids):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-bf16"
    assert main(["export", str(run_dir), "--merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    want = logits(reference(base_dir, run_dir / "adapter"), probe_ids)
    got = logits(merged.float(), probe_ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_merge_never_overwrites_and_leaves_nothing_half_written(tmp_path, run_dir, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--merge", str(taken)]) == 2
    assert "exists" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"

    from transformers import PreTrainedModel

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        main(["export", str(run_dir), "--merge", str(tmp_path / "half")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # neither OUT nor its temp directory


def read_gguf(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return reader, fields, {t.name: t for t in reader.tensors}


def expected_names(layers: int, tied: bool) -> set[str]:
    per_layer = ["attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                 "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    return names | {f"blk.{i}.{n}" for i in range(layers) for n in per_layer}


def test_gguf_q8_0_reads_back_with_llama_cpps_reader(tmp_path, run_dir, base_dir, capsys):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert main(["export", str(run_dir), "--gguf", str(out), "--quant", "q8_0", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    modelfile = tmp_path / "tiny.Modelfile"
    assert f"ollama create tiny-sft -f {modelfile}" in printed
    assert modelfile.read_text().splitlines()[1:] == ["FROM ./tiny.gguf", 'PARAMETER stop "<|im_end|>"']

    config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reader, fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "qwen2" and fields["general.name"] == "tiny-sft"
    assert fields["qwen2.block_count"] == 2 and fields["qwen2.embedding_length"] == 32
    assert fields["qwen2.attention.head_count"] == 4 and fields["qwen2.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size == len(tokenizer) + 3 and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert tokens[tokenizer.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"]) > 0

    assert set(tensors) - {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"} == expected_names(2, False)
    merged = reference(base_dir, run_dir / "adapter").merge_and_unload().state_dict()
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight")]:
        t, want = tensors[gguf_name], merged[hf_name].numpy()
        assert list(t.shape) == list(reversed(want.shape))  # ggml lists dimensions innermost first
        assert t.tensor_type == (Q.F32 if want.ndim == 1 else Q.Q8_0)
        got = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want).max() <= np.abs(want).max() / 127 + 1e-6  # q8_0: one step of 127 per block


def test_gguf_f16_of_a_tied_llama_permutes_q_and_k_as_llama_cpp_does(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "tiny-llama", model_type="llama", tied=True)
    out = tmp_path / "llama.gguf"
    assert main(["export", str(base), "--gguf", str(out), "--quant", "f16", "--dtype", "fp32"]) == 0
    _, fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["llama.rope.dimension_count"] == 8
    assert set(tensors) == expected_names(2, tied=True)
    weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    q = weights["model.layers.0.self_attn.q_proj.weight"].numpy()
    # llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute(q, n_head=4, n_head_kv=4)
    want = q.reshape(4, 2, q.shape[0] // 4 // 2, *q.shape[1:]).swapaxes(1, 2).reshape(q.shape)
    got = tensors["blk.0.attn_q.weight"]
    assert got.tensor_type == Q.F16 and not np.allclose(want, q)
    assert np.allclose(np.asarray(got.data, dtype=np.float32).reshape(q.shape), want, atol=1e-3)


def test_gguf_refuses_what_it_cannot_convert(tmp_path, capsys, run_dir):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    assert main(["export", str(gpt2), "--gguf", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err
    assert "this one is gpt2" in err and "convert_hf_to_gguf.py" in err
    assert main(["export", str(run_dir), "--gguf", str(tmp_path / "x.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--gguf", str(tmp_path / "k.gguf"), "--quant", "q4_k_m"])
    assert e.value.code == 2
    assert not list(tmp_path.glob("*.gguf"))


def test_a_real_training_run_serves_and_exports(tmp_path, base_dir, probe_ids):
    """The adapter `samebox train` writes (not one made by peft here) merges to the logits of base + adapter."""
    from tests.trainer.conftest import alpaca_rows, write_jsonl
    from trainer.config import load_config
    from trainer.loop.recipe import main as train
    from trainer.serve.served import resolve_model

    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(16))
    cfg = load_config(None, [f"model.name={base_dir}", "model.dtype=fp32", f"data.path={data}",
                             f"data.cache_dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'sft'}",
                             "output.tensorboard=false", "train.samples_per_step=8", "train.max_steps=2",
                             "train.lr=5e-2", "train.micro_batch_tokens=256", "lora.dropout=0.0",
                             "train.warmup_ratio=0.0"])
    assert train(cfg) == 0
    served = resolve_model(str(tmp_path / "sft"))
    assert served.adapter_dir == (tmp_path / "sft" / "adapter").resolve() and served.name == "sft"
    assert main(["export", str(tmp_path / "sft"), "--merge", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    want = logits(reference(base_dir, tmp_path / "sft" / "adapter"), probe_ids)
    assert torch.allclose(logits(merged, probe_ids), want, atol=1e-5)
    assert not torch.allclose(logits(reference(base_dir, None), probe_ids), want, atol=1e-4)
