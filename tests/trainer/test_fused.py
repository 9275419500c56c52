"""The fused decoder layers against transformers + peft: same hidden states, same LoRA gradients.

The reference runs each sample alone through the peft-wrapped model (no packing anywhere); the fused decoder
runs them packed in one row. fp32 must agree to rounding; NF4 (bitsandbytes, on the CPU) is compared with an fp32
copy of the dequantized weights, where the fused path must be no further off than peft's own 4-bit path.
"""

from __future__ import annotations

import pytest
import torch

from builder.core.errors import SameboxError
from trainer.fused import fused_decoder
from trainer.fused import kernels as K
from trainer.fused.attention import BACKENDS, Packed
from trainer.fused.linear import quantize_nf4
from trainer.fused.offload import ActivationStore

LENGTHS = [5, 9, 3, 12]


def tiny(kind: str, dtype=torch.float32, targets="all-linear", dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
    config = {"qwen2": lambda: Qwen2Config(**common, use_sliding_window=False),
              "llama": lambda: LlamaConfig(**common, attention_bias=True),
              "mistral": lambda: MistralConfig(**common, sliding_window=None)}[kind]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make it non-zero so every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def samples(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (n,), generator=gen) for n in LENGTHS]


def reference(peft_model, ids, weights, autocast=None):
    """Hidden states of each sample alone, and the LoRA gradients of sum(hidden * weights)."""
    body = peft_model.get_base_model().model
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        hidden = torch.cat([body(input_ids=i[None]).last_hidden_state[0] for i in ids]).float()
    (hidden * weights).sum().backward()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return hidden.detach(), grads


def fused_run(decoder, peft_model, ids, weights):
    flat = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(len(i)) for i in ids])[None]
    cu = torch.tensor([0] + [len(i) for i in ids]).cumsum(0).to(torch.int32)
    hidden = decoder(flat, positions, cu_seq_lens_q=cu, max_length_q=max(LENGTHS)).last_hidden_state[0].float()
    (hidden * weights).sum().backward()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return hidden.detach(), [p.grad.clone() for p in params]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,targets,offload", [
    ("qwen2", "all-linear", True), ("llama", "all-linear", False), ("mistral", ["q_proj", "v_proj", "down_proj"], True),
])
def test_fused_matches_peft_per_sample_in_fp32(kind, targets, offload):
    model = tiny(kind, targets=targets)
    ids = samples()
    weights = torch.randn(sum(LENGTHS), 64, generator=torch.Generator().manual_seed(2))
    ref_hidden, ref_grads = reference(model, ids, weights)
    decoder, note = fused_decoder(model, "auto", torch.float32, torch.device("cpu"), offload=offload)
    assert decoder is not None, note
    hidden, grads = fused_run(decoder, model, ids, weights)
    assert rel(hidden, ref_hidden) < 1e-5
    assert len(grads) == len(ref_grads) and all(g.abs().sum() > 0 for g in ref_grads)
    assert max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-4
    # q_proj's bias (Qwen2) and the frozen weights never get a gradient.
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_fused_nf4_is_as_close_to_fp32_truth_as_peft():
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=256, use_sliding_window=False)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    quantize_nf4(base, torch.device("cpu"))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    # The truth: fp32 weights equal to the dequantized NF4 ones, the same LoRA weights, no 4-bit anywhere.
    truth_base = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = {}
    for name, module in base.named_modules():
        if type(module).__name__ == "Linear4bit":
            state[name + ".weight"] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            if module.bias is not None:
                state[name + ".bias"] = module.bias.float()
        elif isinstance(module, (torch.nn.Embedding,)) or "norm" in type(module).__name__.lower():
            state[name + ".weight"] = module.weight.float()
    truth_base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in state.items()}, strict=False)
    truth = get_peft_model(truth_base, lora)
    lora_weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in truth.named_parameters():
        if p.requires_grad:
            p.data.copy_(lora_weights[n].data)

    ids = samples()
    weights = torch.randn(sum(LENGTHS), 64, generator=torch.Generator().manual_seed(2))
    true_hidden, true_grads = reference(truth, ids, weights)
    peft_hidden, peft_grads = reference(model, ids, weights, autocast=torch.bfloat16)
    decoder, note = fused_decoder(model, "auto", torch.bfloat16, torch.device("cpu"), offload=False)
    assert decoder is not None and decoder.specs[0].qkv.quantized == [True, True, True], note
    hidden, grads = fused_run(decoder, model, ids, weights)
    assert rel(hidden, true_hidden) < 0.02 and rel(hidden, true_hidden) <= 1.5 * rel(peft_hidden, true_hidden)
    worst_fused = max(rel(g, t) for g, t in zip(grads, true_grads, strict=True))
    worst_peft = max(rel(g, t) for g, t in zip(peft_grads, true_grads, strict=True))
    assert worst_fused < 0.05 and worst_fused <= 1.5 * worst_peft


def test_lora_dropout_keeps_the_peft_path_and_true_refuses():
    model = tiny("qwen2", dropout=0.1)
    decoder, note = fused_decoder(model, "auto", torch.float32, torch.device("cpu"), offload=False)
    assert decoder is None and "lora.dropout=0" in note
    with pytest.raises(SameboxError, match="train.fused=true"):
        fused_decoder(model, "true", torch.float32, torch.device("cpu"), offload=False)
    assert fused_decoder(tiny("qwen2"), "false", torch.float32, torch.device("cpu"), offload=False)[0] is None


def test_torch_kernels_backward_match_autograd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w, dy = torch.randn(32, generator=gen, dtype=torch.float64), torch.randn(7, 32, generator=gen, dtype=torch.float64)
    y, rstd = K.rms_norm_torch(x, w, 1e-6)
    (expected,) = torch.autograd.grad(y, x, dy)
    assert torch.allclose(K.rms_norm_backward_torch(dy, x.detach(), w, rstd), expected, atol=1e-10)

    gu = torch.randn(7, 2 * 24, generator=gen, dtype=torch.float64, requires_grad=True)
    da = torch.randn(7, 24, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(K.swiglu_torch(gu), gu, da)
    assert torch.allclose(K.swiglu_backward_torch(gu.detach().clone(), da), expected, atol=1e-10)

    q = torch.randn(7, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(7, 8, generator=gen, dtype=torch.float64)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    rq, rk = K.rope_torch(q, k, cos, sin)
    eq, ek = torch.autograd.grad((rq, rk), (q, k), (dq, dk))
    gq, gk = K.rope_backward_torch(dq, dk, cos, sin)
    assert torch.allclose(gq, eq, atol=1e-10) and torch.allclose(gk, ek, atol=1e-10)


def test_packed_attention_keeps_samples_apart():
    """A sample's output does not change when another sample is packed before it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, h, 8, generator=gen) for h in (4, 2, 2))
    both = BACKENDS["sdpa"](q, k, v, Packed(torch.tensor([0, 8, 20], dtype=torch.int32), 12, (8, 12)), 8 ** -0.5)
    alone = BACKENDS["sdpa"](q[8:], k[8:], v[8:], Packed(torch.tensor([0, 12], dtype=torch.int32), 12, (12,)),
                             8 ** -0.5)
    assert torch.allclose(both[8:], alone, atol=1e-6)


def test_offload_store_round_trips_and_reuses_its_buffers():
    store = ActivationStore(torch.device("cpu"), offload=True)
    tensors = {i: (torch.randn(10, 6), torch.randn(10, 6)) for i in range(3)}
    for i, (a, b) in tensors.items():
        store.save(i, a, b)
    first = store.host_bytes()
    for i in reversed(range(3)):
        if i:
            store.prefetch(i - 1)
        a, b = store.load(i)
        assert torch.equal(a, tensors[i][0]) and torch.equal(b, tensors[i][1])
    for i, (a, b) in tensors.items():  # a second pass of the same size allocates nothing new
        store.save(i, a[:8], b[:8])
    assert store.host_bytes() == first


class FakeCopyEvent:
    """A CUDA event of a copy to the host: done once the test says so; synchronize() waits for it (here: ends it)."""

    log: list[str] = []

    def __init__(self) -> None:
        self.done = False
        self.name = f"copy{sum(not e.startswith('wait') for e in FakeCopyEvent.log)}"
        FakeCopyEvent.log.append(self.name)

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        FakeCopyEvent.log.append(f"wait {self.name}")
        self.done = True


@pytest.mark.parametrize("limit,waits", [(2, 2), (0, 0)])
def test_offload_waits_for_the_oldest_copy_past_the_bound(monkeypatch, limit, waits):
    """At most ``limit`` layers' copies to the host are queued: the forward pass waits for the oldest one past
    it (their tensors stay allocated until then); 0 lets every layer's copy queue (the GPU then holds them all)."""
    from trainer.fused import offload

    FakeCopyEvent.log = []
    monkeypatch.setattr(offload.torch.cuda, "Event", FakeCopyEvent)
    monkeypatch.setenv("SAMEBOX_OFFLOAD_IN_FLIGHT", str(limit))
    store = ActivationStore(torch.device("cpu"), offload=True)
    store.stream = object()  # a side stream, as on a GPU: _bound_in_flight is what save() then calls
    for _ in range(4):
        store._bound_in_flight()
    assert store.waits == waits
    assert len(store.in_flight) == (limit or 4)
    if limit:
        assert FakeCopyEvent.log == ["copy0", "copy1", "copy2", "wait copy0", "copy3", "wait copy1"]
    store.in_flight[0].done = True  # a copy that already ended is not waited for
    store._bound_in_flight()
    assert store.waits == waits
    store.clear()
    assert not store.in_flight


def test_a_small_lora_update_survives_bf16_rounding():
    """After the first optimizer step B is lr-sized: its effect on the hidden states must survive bf16 rounding (it
    did not when the LoRA term was added to an already rounded product or to the residual stream: training then
    lagged transformers + peft). The gain is the share of the fp32 truth's change that the bf16 path reproduces,
    averaged over all hidden values (one value's change is below bf16's resolution; the average is not)."""
    model = tiny("llama", dtype=torch.bfloat16)
    truth = tiny("llama", dtype=torch.float32)  # same seed: the same weights, in fp32
    for (_, p), (_, t) in zip(model.named_parameters(), truth.named_parameters(), strict=True):
        t.data.copy_(p.data.float())
    ids = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(96)[None]
    decoder, note = fused_decoder(model, "auto", torch.bfloat16, torch.device("cpu"), offload=False)
    assert decoder is not None, note

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fused = decoder(ids, positions).last_hidden_state.float()
            exact = truth.get_base_model().model(input_ids=ids, position_ids=positions).last_hidden_state
        return fused, exact

    gen = torch.Generator().manual_seed(3)
    for (name, p), (_, t) in zip(model.named_parameters(), truth.named_parameters(), strict=True):
        if "lora_B" in name:
            p.data.zero_()
            t.data.zero_()
    before_f, before_t = both()
    for (name, p), (_, t) in zip(model.named_parameters(), truth.named_parameters(), strict=True):
        if "lora_B" in name:  # what one AdamW step at lr 2e-4 makes of B = 0: +-lr everywhere
            step = 2e-4 * torch.randint(0, 2, p.shape, generator=gen).float().mul(2).sub(1)
            p.data.copy_(step)
            t.data.copy_(step)
    after_f, after_t = both()
    delta_f, delta_t = (after_f - before_f).flatten(), (after_t - before_t).flatten()
    gain = float(delta_f @ delta_t / (delta_t @ delta_t))
    assert 0.85 < gain < 1.2, gain  # the LoRA term added to the rounded product or residual: 0.76


def test_the_backend_check_warns_of_nothing() -> None:
    """The start of every run compares the attention backends; it printed torch's 'requires_grad ... to a scalar'
    warning each time."""
    import warnings

    from trainer.fused.attention import check

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = check("sdpa", torch.device("cpu"), torch.float32, 4, 2, 16)
    assert err < 1e-5
