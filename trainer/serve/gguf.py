"""Merged HF weights -> one GGUF file (llama.cpp's format, written by its own `gguf` package), for ollama and
llama.cpp users.

What llama.cpp's convert_hf_to_gguf.py does for these models, kept to what samebox trains: Llama and Qwen2
architectures (Mistral is Llama to llama.cpp) with a byte-level BPE tokenizer (Qwen2/2.5, Llama 3.0), no RoPE
scaling. Anything else is refused with the way to convert it there. Quantization types are those the gguf package
quantizes in Python, named as llama.cpp names them; the k-quants (q4_k_m, ...) need llama.cpp's `llama-quantize`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import SameboxError

# llama.cpp's names of the tensor types the gguf package quantizes in Python (``_types`` maps them)
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# HF model_type -> (llama.cpp architecture, tokenizer pre-tokenizer name as llama.cpp spells it)
ARCHITECTURES: dict[str, tuple[str, str]] = {"qwen2": ("qwen2", "qwen2"), "llama": ("llama", "llama-bpe"),
                                             "mistral": ("llama", "llama-bpe")}
LLAMA_CPP_HINT = ("convert the merged directory (samebox export RUN_DIR --merge DIR) with llama.cpp's "
                  "convert_hf_to_gguf.py, which knows every architecture and tokenizer")


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    architecture: str
    quant: str
    tensors: int
    fallback_f16: tuple[str, ...]  # tensors whose rows do not divide into the quant's blocks


def _types(quant: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
             "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
             "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}
    return table[quant]


def check_convertible(config: Any, tokenizer_dir: Path) -> tuple[str, str]:
    """(llama.cpp architecture, pre-tokenizer name), or a SameboxError saying why llama.cpp's converter is needed."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise SameboxError(f"--gguf converts {', '.join(ARCHITECTURES)} models; this one is {model_type}",
                           LLAMA_CPP_HINT)
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise SameboxError(f"--gguf does not write RoPE scaling ({rope.get('rope_type')})", LLAMA_CPP_HINT)
    try:
        tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SameboxError(f"--gguf needs the fast tokenizer's tokenizer.json in {tokenizer_dir}",
                           LLAMA_CPP_HINT) from None
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tokenizer_json.get("pre_tokenizer")):
        raise SameboxError("--gguf writes byte-level BPE vocabularies (Qwen2, Llama 3); this tokenizer is "
                           f"{model.get('type')} without a ByteLevel pre-tokenizer (SentencePiece?)", LLAMA_CPP_HINT)
    return ARCHITECTURES[model_type]


def _rope(config: Any) -> dict:
    """RoPE settings: transformers 5 keeps them in rope_parameters, 4.x in rope_theta/rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def write_gguf(model: Any, tokenizer: Any, tokenizer_dir: Path, out: Path, quant: str, name: str) -> GgufSummary:
    """Write ``model`` (a merged transformers causal LM) and its tokenizer to ``out`` (a path the caller makes
    atomic)."""
    import gguf

    config = model.config
    arch, pre = check_convertible(config, tokenizer_dir)
    tensor_type, file_type = _types(quant)
    writer = gguf.GGUFWriter(str(out), arch)
    _write_params(writer, config, arch, name, file_type)
    _write_vocab(writer, tokenizer, tokenizer_dir, pre, config.vocab_size)
    fallback = _write_tensors(writer, model, arch, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufSummary(out, arch, quant, len(model.state_dict()), tuple(fallback))


def _write_params(writer: Any, config: Any, arch: str, name: str, file_type: int) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer: Any, tokenizer: Any, tokenizer_dir: Path, pre: str, vocab_size: int) -> None:
    """As llama.cpp's get_vocab_base: ids past the tokenizer's up to the embedding rows are [PADn] (unused), added
    tokens are control tokens when special, user-defined otherwise."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _write_tensors(writer: Any, model: Any, arch: str, tensor_type: Any) -> list[str]:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    config = model.config
    names = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    block = gguf.GGML_QUANT_SIZES[tensor_type][0]
    fallback = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when tied
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SameboxError(f"--gguf has no llama.cpp name for tensor {hf_name}", LLAMA_CPP_HINT)
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _permute_rope(data, config, kv=name.endswith("attn_k.weight"))
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32), raw_dtype=Q.F32)  # norms and biases stay f32
        elif tensor_type == Q.F32:
            writer.add_tensor(name, data, raw_dtype=Q.F32)
        elif tensor_type == Q.F16 or data.shape[-1] % block:
            if tensor_type != Q.F16:
                fallback.append(name)
            writer.add_tensor(name, data.astype(np.float16), raw_dtype=Q.F16)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    return fallback


def _arch_enum(arch: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)


def _permute_rope(w: Any, config: Any, kv: bool) -> Any:
    """HF's Llama q/k rows are in rotate-half order; llama.cpp's llama architecture wants interleaved pairs."""
    heads = config.num_attention_heads
    if kv:
        heads = getattr(config, "num_key_value_heads", None) or heads
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
