"""Tests for lora_np/qlora.py: a 4-bit frozen base under LoRA (QLoRA): storage, gradients, order, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers import assert_untouched, perturb_adapters, snapshot, tiny_gpt

from lora_np.gradcheck import gradcheck
from lora_np.lora import TARGETS, LoRAConfig, apply_lora, lora_layers, merge, prepare_finetuning, target_layers
from lora_np.qlora import QuantizedWeight, dequantize_base, quantize_base, quantized_weights, weight_bytes
from lora_np.quantize import QuantConfig, quantize_nf4

BLOCK = 8  # divides every weight of the tiny GPT (8x8 and 8x32)


def batch(seed=0, n=2, T=8, V=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(n, T)), rng.integers(0, V, size=(n, T))


def qlora_gpt(order="quantize-first", double_quant=False, seed=0):
    """A tiny GPT with a 4-bit base and LoRA on q, v whose factors hold random values."""
    model, lora, quant = tiny_gpt(seed), LoRAConfig(r=2, alpha=4.0), QuantConfig(block=BLOCK, double_quant=double_quant)
    if order == "quantize-first":
        apply_lora(quantize_base(model, quant), lora)
    else:
        quantize_base(apply_lora(model, lora), quant)
    perturb_adapters(model, seed=7, std=0.3)
    return model


def test_every_block_linear_is_stored_in_4_bits_and_the_rest_stays_float():
    model = quantize_base(tiny_gpt(), block=BLOCK)
    names = sorted(quantized_weights(model))
    assert names == sorted(f"{n}.weight" for n, *_ in target_layers(model, TARGETS))
    assert not isinstance(model.lm_head.weight, QuantizedWeight) and model.quant_config == QuantConfig(block=BLOCK)
    w = model.blocks[0].attn.q.weight
    assert "data" not in vars(w)  # no float copy of W is kept: .data is computed from the codes on every read
    assert w.shape == (8, 8) and w.dtype == np.float32 and w.size == 64
    assert w.nbytes == 64 // 2 + 4 * 64 // BLOCK


def test_forward_is_the_model_with_dequantized_weights():
    model = tiny_gpt()
    expected = copy.deepcopy(model)
    for _, _, _, layer in target_layers(expected, TARGETS):  # the same weights, dequantized by hand
        layer.weight.data = quantize_nf4(layer.weight.data, BLOCK).dequantize()
    quantize_base(model, block=BLOCK)
    x, y = batch()
    assert np.array_equal(model(x, y)[1].data, expected(x, y)[1].data)


def test_quantize_before_or_after_apply_lora_is_the_same_model():
    x, y = batch()
    results = []
    for order in ("quantize-first", "lora-first"):
        model = qlora_gpt(order)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.data, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert np.array_equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(np.array_equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("double_quant", [False, True])
def test_only_the_adapters_get_gradients(double_quant):
    model = qlora_gpt(double_quant=double_quant)
    x, y = batch()
    model(x, y)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.{f}" for n in lora_layers(model) for f in ("A", "B")}
    assert all(p.grad is None and not p.requires_grad for p in quantized_weights(model).values())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for m in lora_layers(model).values()
                                                             for p in (m.A, m.B)}


def test_gradcheck_of_a_qlora_model_through_its_adapters():
    model = qlora_gpt().to(np.float64)
    x, y = batch()
    q, v = model.blocks[0].attn.q, model.blocks[1].attn.v
    assert isinstance(q.weight, QuantizedWeight) and q.weight.data.dtype == np.float64
    # the inputs are the model's own factors: gradcheck nudges them in place and reads the loss
    gradcheck(lambda *_: model(x, y)[1], q.A, q.B, v.A, v.B)


def test_a_float64_model_keeps_its_codes():
    model = qlora_gpt()
    w = model.blocks[0].mlp.up.weight
    codes = w.quantized.packed.copy()
    model.to(np.float64)
    assert w.dtype == np.float64 and np.array_equal(w.quantized.packed, codes)
    assert np.array_equal(w.data, w.quantized.dequantize().astype(np.float64))


def test_dequantize_base_then_merge_gives_the_adapted_outputs():
    model = qlora_gpt()
    x, _ = batch()
    with model.inference():
        before = model(x)[0].data
    dequantize_base(model)
    assert not quantized_weights(model) and not hasattr(model, "quant_config")
    merge(model)
    with model.inference():
        assert np.allclose(model(x)[0].data, before, atol=1e-5)


def test_weight_bytes_per_number():
    model = tiny_gpt()
    assert weight_bytes(model)["bytes"] == 4 * weight_bytes(model)["numbers"]
    quantize_base(model, block=BLOCK)
    assert weight_bytes(model)["bytes"] == weight_bytes(model)["numbers"] * (0.5 + 4 / BLOCK)


# -- what a 4-bit weight refuses, with the model unchanged -------------------------------------------------------


def test_merge_into_a_4bit_weight_is_refused_and_changes_nothing():
    model = qlora_gpt()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="a 4-bit weight is frozen"):
        merge(model)  # W + s·A·B is not a 4-bit number
    assert_untouched(before, model)


def test_new_values_and_training_are_refused():
    model = qlora_gpt()
    w = model.blocks[0].attn.k.weight
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot take new ones"):
        w.data = w.data + 1.0
    with pytest.raises(ValueError, match="blocks.0.attn.q.weight: a 4-bit weight .* cannot take new ones"):
        model.load_state_dict({n: a + 1.0 for n, a in model.state_dict().items()})  # checked before any write
    with pytest.raises(RuntimeError, match="cannot train"):
        w.requires_grad = True
    assert_untouched(before, model)
    q4 = quantize_base(tiny_gpt(), block=BLOCK)
    for p in q4.parameters():
        p.requires_grad = False  # frozen, as a model is after another set-up: the refusal must leave it so
    flags = [p.requires_grad for p in q4.parameters()]
    with pytest.raises(RuntimeError, match="cannot train"):
        prepare_finetuning(q4, None)  # full fine-tuning of a 4-bit base
    assert [p.requires_grad for p in q4.parameters()] == flags  # refused, and no flag left changed


ERRORS = [
    # name                      set-up       call                                   error         message
    ("block-does-not-divide",   tiny_gpt,    lambda m: quantize_base(m, block=6),   ValueError,
     r"blocks.0.attn.q.weight: quantize: block 6 does not divide the weight's size 64"),
    ("block-divides-some-only", tiny_gpt,    lambda m: quantize_base(m, block=128), ValueError,
     r"blocks.0.attn.q.weight: .*block 128 does not divide"),
    ("bad-config",              tiny_gpt,    lambda m: quantize_base(m, kind="fp4"), ValueError, "kind must be one of"),
    ("config-and-keywords",     tiny_gpt,    lambda m: quantize_base(m, QuantConfig(), block=8), TypeError, "not both"),
    ("already-quantized",       lambda: quantize_base(tiny_gpt(), block=8), lambda m: quantize_base(m, block=8),
     RuntimeError, "already quantized"),
    ("merged-lora",             lambda: _merged(), lambda m: quantize_base(m, block=8), RuntimeError, "unmerge"),
    ("nan-weight",              lambda: _nan(),  lambda m: quantize_base(m, block=8),   ValueError,
     "blocks.1.mlp.down.weight: quantize: .*NaN"),
    ("dequantize-a-float-base", tiny_gpt,    dequantize_base,                       ValueError,   "no 4-bit weights"),
]  # fmt: skip


def _merged():
    model = apply_lora(tiny_gpt(), r=2)
    perturb_adapters(model)
    merge(model)
    return model


def _nan():
    model = tiny_gpt()
    model.blocks[1].mlp.down.weight.data[0, 0] = np.nan  # the last layer: every other one quantizes first
    return model


@pytest.mark.parametrize("make, call, error, message", [pytest.param(*row[1:], id=row[0]) for row in ERRORS])
def test_bad_input_is_one_clear_error_and_the_model_is_unchanged(make, call, error, message):
    model = make()
    before, ids = snapshot(model), [(n, id(p)) for n, p in model.named_parameters()]
    had_config = hasattr(model, "quant_config")
    with pytest.raises(error, match=message):
        call(model)
    assert [(n, id(p)) for n, p in model.named_parameters()] == ids  # no weight replaced
    assert hasattr(model, "quant_config") == had_config
    if not any(np.isnan(a).any() for a in before["state"].values()):  # array_equal never equals a NaN
        assert_untouched(before, model)
