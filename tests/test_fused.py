"""Tests for lora_np/fused.py: the model's fast op gives what the lesson's ops give (``lora.lora_linear`` for a LoRA
layer, ``F.linear`` for a plain one), the values and every gradient, on every path. Its own gradient checks are
rows of the one table in tests/test_gradcheck.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import lora_np.functional as F
from lora_np import backend as lora_backend
from lora_np.engine import Tensor, concat
from lora_np.fused import LinearPart, fused_linear
from lora_np.lora import LoRALinear, lora_linear
from lora_np.nn import Linear

D_IN = 5
LORA, PLAIN = "lora", "plain"
PATHS = [  # name, the parts as (kind, d_out, rank, bias, W trains, dropout), does x require a gradient
    ("plain", [(PLAIN, 4, 0, True, True, False)], True),
    ("plain-q-k-v", [(PLAIN, 4, 0, True, True, False), (PLAIN, 3, 0, False, True, False),
                     (PLAIN, 2, 0, True, True, False)], True),
    ("lora", [(LORA, 4, 2, True, False, False)], True),
    ("lora-q-k-v", [(LORA, 4, 2, True, False, False), (LORA, 4, 1, True, False, False),
                    (LORA, 3, 2, False, False, False)], True),
    ("dropout", [(LORA, 4, 2, True, False, True)], True),
    ("dropout-and-plain", [(LORA, 4, 2, True, False, True), (PLAIN, 3, 0, True, False, False)], True),
    ("frozen-x", [(LORA, 4, 2, True, False, False), (LORA, 3, 1, False, False, True)], False),
    ("frozen-x-one-layer", [(LORA, 4, 2, True, False, False)], False),
    ("trainable-W", [(LORA, 4, 2, True, True, False), (LORA, 3, 2, True, True, True)], True),
    ("trainable-W-one-layer", [(LORA, 4, 3, True, True, False)], True),
]


def build_part(rand, kind, d_out, r, bias, w_trains, dropout, seed):
    W, b = rand(D_IN, d_out, requires_grad=w_trains), rand(d_out, requires_grad=w_trains) if bias else None
    if kind == PLAIN:
        return LinearPart(W, b)
    keep = (np.random.default_rng(seed).random((2, 3, D_IN)) > 0.3) / 0.7 if dropout else None
    keep = None if keep is None else lora_backend.to_device(keep)  # a mask lives where the activations do
    return LinearPart(W, b, rand(D_IN, r), rand(r, d_out), 1.5 - 0.5 * seed, keep)


def lesson(x, p: LinearPart) -> Tensor:
    """One part by the op a student reads."""
    return F.linear(x, p.W, p.b) if p.A is None else lora_linear(x, p.W, p.b, p.A, p.B, p.s, p.keep)


def forward_backward(fn, leaves, g):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(g)
    return y.numpy(), [None if t.grad is None else lora_backend.to_numpy(t.grad).copy() for t in leaves]


@pytest.mark.parametrize("spec, x_grad", [pytest.param(spec, x_grad, id=name) for name, spec, x_grad in PATHS])
def test_fused_linear_agrees_with_the_lesson(backend, rand, spec, x_grad):
    x = rand(2, 3, D_IN, requires_grad=x_grad)
    parts = [build_part(rand, *s, seed=i) for i, s in enumerate(spec)]
    leaves = [x] + [t for p in parts for t in (p.W, p.b, p.A, p.B) if t is not None]
    g = rand(2, 3, sum(s[1] for s in spec), requires_grad=False).data
    fast, fast_grads = forward_backward(lambda: fused_linear(x, parts), leaves, g)
    slow, slow_grads = forward_backward(lambda: concat([lesson(x, p) for p in parts], axis=-1), leaves, g)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)
    for t, a, b in zip(leaves, fast_grads, slow_grads):
        assert (a is None) == (b is None) == (not t.requires_grad)  # a frozen input gets no gradient from either
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_model_runs_the_fused_op_with_the_lessons_values(dropout):
    """LoRALinear (the model's layer) goes through fused_linear; in float32 it equals lora_linear to rounding."""
    layer = LoRALinear(Linear(6, 5, gen=np.random.default_rng(0)), r=2, alpha=4.0, dropout=dropout, seed=1)
    layer.B.data[:] = np.random.default_rng(2).standard_normal(layer.B.shape)  # a trained B, not zero
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 6)), requires_grad=True)
    keep = copy.deepcopy(layer).dropout_keep(x.shape)  # the mask the layer is about to draw
    y = layer(x)
    assert y._op == "fused_linear"
    np.testing.assert_allclose(y.data, lora_linear(x, layer.weight, layer.bias, layer.A, layer.B, layer.scaling,
                                                   keep).data, rtol=1e-5, atol=1e-6)


def test_a_plain_part_is_just_w_and_b(rand):
    W, b = rand(3, 2), rand(2)
    p = LinearPart(W, b)
    assert (p.A, p.B, p.s, p.keep) == (None, None, 0.0, None) and not p.merged
    assert LinearPart(W, b, rand(3, 1), rand(1, 2), 2.0).merged  # an adapter without dropout is merged on the fly
