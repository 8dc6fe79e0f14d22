"""Tests for lora_np/model.py: config checks, shapes, the loss at initialisation, causality, generation,
a whole-model gradient check (base and LoRA) and overfitting one batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TINY, assert_untouched, snapshot, tiny_gpt

from lora_np import lora
from lora_np.gradcheck import gradcheck
from lora_np.model import GPT, GPTConfig
from lora_np.optim import AdamW


def batch(B: int = 3, T: int = 8, V: int = 11, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


# --- config ------------------------------------------------------------------------------------------------------


def test_config_defaults_are_valid_and_round_trip_through_a_dict():
    cfg = GPTConfig(**TINY)
    assert GPTConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["n_embd"] == 8
    GPTConfig()  # the defaults themselves pass validation


def test_config_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="n_embd=10 must be divisible by n_head=4"):
        GPTConfig(n_embd=10, n_head=4)


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True, "8"])
def test_config_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be a positive integer"):
        GPTConfig(**{**TINY, field: value})


@pytest.mark.parametrize("p", [-0.1, 1.0, 2.0, math.nan, True, "0.1"])
def test_config_dropout_must_be_in_0_1(p):
    with pytest.raises(ValueError, match=r"GPTConfig\.dropout must be a number in \[0, 1\), got "):
        GPTConfig(**TINY, dropout=p)


@pytest.mark.parametrize("field, value", [("bias", 1), ("bias", "yes"), ("seed", -1), ("seed", True), ("seed", 1.5)])
def test_config_bias_and_seed_are_checked(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field} must be .*, got {value!r}"):
        GPTConfig(**TINY, **{field: value})


# --- forward -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,T", [(1, 1), (3, 5), (2, 8)])
def test_forward_shapes(B, T):
    model = tiny_gpt()
    idx, tgt = batch(B, T)
    logits, loss = model(idx)
    assert logits.shape == (B, T, 11) and loss is None
    logits, loss = model(idx, tgt)
    assert logits.shape == (B, T, 11) and loss.shape == ()
    assert logits.dtype == np.float32


def test_loss_at_init_is_about_ln_vocab():
    # Weights ~ N(0, 0.02²) give near-zero logits, so the prediction is almost uniform: loss ≈ ln V.
    model = tiny_gpt(vocab_size=50, block_size=16, n_embd=16)
    idx, tgt = batch(8, 16, V=50)
    _, loss = model(idx, tgt)
    assert abs(loss.item() - math.log(50)) < 0.05


def test_sequence_longer_than_block_size_is_an_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        model(np.zeros((1, 9), dtype=np.int64))


@pytest.mark.parametrize("shape", [(8,), (1, 2, 8), ()])
def test_idx_must_be_two_dimensional(shape):
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) token ids"):
        tiny_gpt()(np.zeros(shape, dtype=np.int64))


def test_token_ids_out_of_range_are_an_error():
    with pytest.raises(ValueError, match="ids in"):
        tiny_gpt()(np.array([[0, 11]]))


@pytest.mark.parametrize("t", [0, 3, 7])
def test_causality_changing_token_t_changes_nothing_before_t(t):
    model = tiny_gpt()
    idx, _ = batch(2, 8)
    changed = idx.copy()
    changed[:, t] = (changed[:, t] + 1) % 11
    a, b = model(idx)[0].data, model(changed)[0].data
    # Masked scores are exactly -inf, so their softmax weights are exactly 0: positions < t see bit-identical inputs.
    assert np.array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t], b[:, t], rtol=0, atol=1e-7)  # ... while position t itself sees the change


def test_causality_with_dropout_in_eval_mode_and_float64():
    model = tiny_gpt(dropout=0.3).to(np.float64).eval()
    idx, _ = batch(2, 8, seed=5)
    changed = idx.copy()
    changed[:, 4] = (changed[:, 4] + 3) % 11
    a, b = model(idx)[0].data, model(changed)[0].data
    assert np.array_equal(a[:, :4], b[:, :4])
    assert not np.array_equal(a[:, 4:], b[:, 4:])


# --- generate ----------------------------------------------------------------------------------------------------


def test_generate_shape_range_and_prompt_kept():
    model = tiny_gpt()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, 12, seed=0)  # 3 + 12 > block_size: the context is cropped to the last 8
    assert out.shape == (2, 15) and out.dtype == np.int64
    assert np.array_equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < 11


def test_generate_accepts_a_single_sequence():
    assert tiny_gpt().generate(np.array([1, 2]), 3, seed=0).shape == (1, 5)


def test_generate_same_seed_same_output_different_seed_differs():
    model = tiny_gpt()
    prompt = np.array([[0, 1]])
    a = model.generate(prompt, 20, seed=1)
    assert np.array_equal(a, model.generate(prompt, 20, seed=1))
    # Near-uniform predictions at init: 20 draws from 11 tokens, so another seed gives another sequence
    # (all five coinciding has probability ~ 5 · 11^-20).
    others = [model.generate(prompt, 20, seed=s) for s in range(2, 7)]
    assert any(not np.array_equal(a, o) for o in others)


GENERATE_ERRORS = {  # (prompt ids, keyword arguments, what the message says)
    "temperature 0": ([[0]], {"temperature": 0.0}, r"temperature must be a finite number > 0, got 0\.0"),
    "temperature < 0": ([[0]], {"temperature": -1.0}, r"temperature must be a finite number > 0, got -1\.0"),
    "temperature NaN": ([[0]], {"temperature": math.nan}, r"temperature must be a finite number > 0, got nan"),
    "temperature inf": ([[0]], {"temperature": math.inf}, r"temperature must be a finite number > 0, got inf"),
    "empty prompt": (np.zeros((1, 0), np.int64), {}, r"T >= 1 tokens to continue, got shape \(1, 0\)"),
}


@pytest.mark.parametrize("case", GENERATE_ERRORS)
def test_generate_refuses_bad_arguments(case):
    idx, kwargs, message = GENERATE_ERRORS[case]
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.generate(np.asarray(idx), 1, **kwargs)
    assert_untouched(before, model)


@pytest.mark.parametrize("top_k", [0, -1, 12])
def test_generate_rejects_top_k_out_of_range(top_k):
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 11\]"):
        tiny_gpt().generate(np.array([[0]]), 1, top_k=top_k)


def test_top_k_1_is_greedy_decoding():
    model = tiny_gpt(seed=3)
    ids = np.array([[2, 7], [5, 5]])
    out = model.generate(ids, 10, top_k=1, seed=123)
    for _ in range(10):  # argmax decoding by hand
        logits, _ = model(ids[:, -8:])
        nxt = logits.data[:, -1, :].argmax(axis=-1)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    assert np.array_equal(out, ids)
    assert np.array_equal(out, model.generate(out[:, :2], 10, top_k=1, seed=999))  # the seed cannot matter


def test_low_temperature_approaches_greedy():
    model = tiny_gpt(seed=3)
    ids = np.array([[2, 7]])
    assert np.array_equal(model.generate(ids, 6, temperature=1e-6, seed=0), model.generate(ids, 6, top_k=1))


def test_generate_restores_the_previous_mode():
    model = tiny_gpt(dropout=0.2)
    model.generate(np.array([[0]]), 3, seed=0)
    assert all(m.training for _, m in model.named_modules())
    model.eval()
    model.generate(np.array([[0]]), 3, seed=0)
    assert not any(m.training for _, m in model.named_modules())


def test_generate_ignores_dropout_and_records_no_graph():
    model = tiny_gpt(dropout=0.5)
    a = model.generate(np.array([[1]]), 8, seed=4)
    assert np.array_equal(a, model.eval().generate(np.array([[1]]), 8, seed=4))  # dropout off while generating
    assert all(p.grad is None for p in model.parameters())


# --- gradients ---------------------------------------------------------------------------------------------------

GRADCHECK_CFG = dict(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=4)  # ~570 numbers: ~1 s


def randomise(params, seed: int, std: float = 0.5) -> None:
    """Larger random values than the 0.02 init, so gradients are large enough that a wrong one cannot hide under
    gradcheck's absolute tolerance."""
    rng = np.random.default_rng(seed)
    for p in params:
        p.data[...] = rng.standard_normal(p.shape) * std


def test_whole_model_gradcheck_float64():
    model = GPT(GPTConfig(**GRADCHECK_CFG)).to(np.float64)
    randomise(model.parameters(), seed=0)
    idx, tgt = batch(2, 4, V=7, seed=1)
    params = model.trainable_parameters()
    assert len(params) == len(model.parameters())
    # gradcheck nudges each parameter's .data in place, so the closure ignores its arguments and just reruns the
    # model: the Parameter objects themselves are the inputs.
    result = gradcheck(lambda *ps: model(idx, tgt)[1], *params)
    assert result.max_error < 1e-6


def test_whole_model_gradcheck_with_lora():
    model = GPT(GPTConfig(**GRADCHECK_CFG))
    lora.apply_lora(model, lora.LoRAConfig(targets="all-linear", r=2, alpha=3.0))
    model.to(np.float64)
    randomise(model.parameters(), seed=2)  # B ≠ 0 too, so the gradient of A is not trivially zero
    idx, tgt = batch(2, 4, V=7, seed=3)
    params = model.trainable_parameters()
    adapters = [p for m in lora.lora_layers(model).values() for p in (m.A, m.B)]
    assert [id(p) for p in params] == [id(p) for p in adapters]  # only A and B are checked (and trained)
    result = gradcheck(lambda *ps: model(idx, tgt)[1], *params)
    assert result.max_error < 1e-6
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # W got nothing


def test_tiny_gpt_overfits_one_batch():
    model = tiny_gpt()
    idx, tgt = batch(4, 8, seed=0)
    opt = AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        _, loss = model(idx, tgt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::25]
    assert abs(losses[0] - math.log(11)) < 0.1
