"""Tests for lora_np/gradcheck.py, and the one table that every op of the engine and every functional goes through.

Each row of ``CASES`` is ``(name, fn, input shapes[, extra])``. The test builds random float64 inputs of those
shapes (``extra["domain"]`` keeps them where ``fn`` is smooth, ``extra["frozen"]`` lists inputs created with
requires_grad=False) and asserts that the analytic gradient of ``fn`` matches central differences to 1e-6.
A new op is tested by adding one row.
"""

from __future__ import annotations

import operator
import re

import numpy as np
import pytest

import lora_np.functional as F
from lora_np import backend
from lora_np.engine import Tensor, concat, split, stack, where
from lora_np.fused import LinearPart, fused_linear
from lora_np.gradcheck import GradcheckError, GradcheckResult, gradcheck
from lora_np.lora import dora_linear, lora_linear
from lora_np.multi_adapter import multi_lora_linear
from lora_np.qlora import QuantizedWeight
from lora_np.quantize import quantize_nf4


def ix(a):
    """An index, mask or target array on the active backend (built when the case runs, not at import)."""
    return backend.to_device(np.asarray(a))


def nf4(W):
    """W frozen in 4 bits (NF4, blocks of 4): every read dequantizes it, and gradcheck never nudges it."""
    return QuantizedWeight(quantize_nf4(W.data, block=4), W.dtype)


def keep_235():
    return ix((np.random.default_rng(5).random((2, 3, 5)) > 0.3) / 0.7)  # LoRA dropout mask for x (2, 3, 5)


def weigh(parts, axis):
    """Scale the i-th piece by i + 1 and join them again, so each piece of a split gets its own gradient."""
    return concat([p * float(i + 1) for i, p in enumerate(parts)], axis=axis)


def soft_45():
    """Four target distributions over 5 classes (rows sum to 1): a teacher's probabilities."""
    p = np.random.default_rng(7).random((4, 5)) ** 3
    return ix(p / p.sum(axis=-1, keepdims=True))


def mask_34():
    return ix(np.arange(12).reshape(3, 4) % 3 == 0)  # (3, 4), True at 0, 3, 6, 9


def causal_44():
    return ix(np.triu(np.ones((4, 4), dtype=bool), k=1))  # True above the diagonal: the future


def attention(q, k, v):  # a small composite: softmax(q kᵀ / √hs) v, (B, T, hs) throughout
    return F.softmax(q @ k.transpose(0, 2, 1) * (1 / np.sqrt(q.shape[-1])), axis=-1) @ v


BINARY = [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul), ("div", operator.truediv)]
BROADCASTS = [  # name, shape of the left operand, shape of the right operand
    ("same", (3, 4), (3, 4)),
    ("scalar-shaped", (3, 4), ()),
    ("scalar-shaped-left", (), (3, 4)),
    ("row", (3, 4), (1, 4)),
    ("column", (3, 4), (3, 1)),
    ("row-by-column", (3, 1), (1, 4)),
    ("ones", (3, 4), (1, 1)),  # two stretched axes in one operand
    ("mixed", (2, 1, 4), (1, 3, 1)),
    ("batch", (2, 3, 4), (3, 4)),
    ("batch-left", (3, 4), (2, 3, 4)),
]
BINARY_CASES = [
    (f"{op_name}-{b_name}", op, [left, right], {"domain": "away0"} if op_name == "div" else {})
    for op_name, op in BINARY
    for b_name, left, right in BROADCASTS
]

CASES = BINARY_CASES + [
    # name                        fn                                            input shapes, extra
    # -- scalar operands, both sides --
    ("add-scalar",                lambda x: x + 2.0,                            [(3, 4)]),
    ("radd-scalar",               lambda x: 2.0 + x,                            [(3, 4)]),
    ("sub-scalar",                lambda x: x - 2.0,                            [(3, 4)]),
    ("rsub-scalar",               lambda x: 2 - x,                              [(3, 4)]),
    ("mul-scalar",                lambda x: x * 3.0,                            [(3, 4)]),
    ("rmul-scalar",               lambda x: 3 * x,                              [(3, 4)]),
    ("div-scalar",                lambda x: x / 4.0,                            [(3, 4)]),
    ("rdiv-scalar",               lambda x: 2 / x,                              [(3, 4)], {"domain": "away0"}),
    ("rmul-array",                lambda x: ix(np.arange(4.0)) * x,             [(3, 4)]),
    ("pow-2",                     lambda x: x**2,                               [(3, 4)]),
    ("pow-3",                     lambda x: x**3,                               [(3, 4)]),
    ("pow-0.5",                   lambda x: x**0.5,                             [(3, 4)], {"domain": "positive"}),
    ("pow-minus-1",               lambda x: x**-1,                              [(3, 4)], {"domain": "away0"}),
    ("neg",                       lambda x: -x,                                 [(3, 4)]),
    # -- matrix product --
    ("matmul-2d",                 lambda a, b: a @ b,                           [(3, 4), (4, 5)]),
    ("matmul-batched-3d",         lambda a, b: a @ b,                           [(2, 3, 4), (2, 4, 5)]),
    ("matmul-batched-4d",         lambda a, b: a @ b,                           [(2, 3, 2, 4), (2, 3, 4, 3)]),
    ("matmul-batch-broadcast",    lambda a, b: a @ b,                           [(2, 1, 3, 4), (5, 4, 2)]),
    ("matmul-weight",             lambda a, b: a @ b,                           [(2, 3, 4), (4, 5)]),
    ("matmul-weight-4d",          lambda a, b: a @ b,                           [(2, 2, 3, 4), (4, 5)]),
    ("matmul-2d-by-batched",      lambda a, b: a @ b,                           [(3, 4), (2, 4, 5)]),
    ("matmul-frozen-weight",      lambda a, b: a @ b,                           [(2, 3, 4), (4, 5)], {"frozen": (1,)}),
    ("matmul-frozen-input",       lambda a, b: a @ b,                           [(2, 3, 4), (4, 5)], {"frozen": (0,)}),
    # -- reductions --
    ("sum-all",                   lambda x: x.sum(),                            [(2, 3, 4)]),
    ("sum-all-keepdims",          lambda x: x.sum(keepdims=True),               [(2, 3, 4)]),
    ("sum-axis0",                 lambda x: x.sum(axis=0),                      [(2, 3, 4)]),
    ("sum-axis-1",                lambda x: x.sum(axis=-1),                     [(2, 3, 4)]),
    ("sum-axis1-keepdims",        lambda x: x.sum(axis=1, keepdims=True),       [(2, 3, 4)]),
    ("sum-axes02",                lambda x: x.sum(axis=(0, 2)),                 [(2, 3, 4)]),
    ("sum-axes02-keepdims",       lambda x: x.sum(axis=(0, -1), keepdims=True), [(2, 3, 4)]),
    ("mean-all",                  lambda x: x.mean(),                           [(2, 3, 4)]),
    ("mean-all-keepdims",         lambda x: x.mean(keepdims=True),              [(2, 3, 4)]),
    ("mean-axis0",                lambda x: x.mean(axis=0),                     [(2, 3, 4)]),
    ("mean-axis-1-keepdims",      lambda x: x.mean(axis=-1, keepdims=True),     [(2, 3, 4)]),
    ("mean-axes12",               lambda x: x.mean(axis=(1, 2)),                [(2, 3, 4)]),
    ("mean-axes01-keepdims",      lambda x: x.mean(axis=(0, 1), keepdims=True), [(2, 3, 4)]),
    ("max-all",                   lambda x: x.max(),                            [(2, 3, 4)]),
    ("max-all-keepdims",          lambda x: x.max(keepdims=True),               [(2, 3, 4)]),
    ("max-axis0",                 lambda x: x.max(axis=0),                      [(2, 3, 4)]),
    ("max-axis-1",                lambda x: x.max(axis=-1),                     [(2, 3, 4)]),
    ("max-axis1-keepdims",        lambda x: x.max(axis=1, keepdims=True),       [(2, 3, 4)]),
    # -- shape ops --
    ("reshape-tuple",             lambda x: x.reshape((6, 4)),                  [(2, 3, 4)]),
    ("reshape-args-minus1",       lambda x: x.reshape(4, -1),                   [(2, 3, 4)]),
    ("reshape-flat",              lambda x: x.reshape(-1),                      [(2, 3, 4)]),
    ("transpose-full-perm",       lambda x: x.transpose(2, 0, 1),               [(2, 3, 4)]),
    ("transpose-reverse",         lambda x: x.transpose(),                      [(2, 3, 4)]),
    ("transpose-swap-two",        lambda x: x.transpose(0, 2),                  [(2, 3, 4)]),
    ("transpose-swap-last-two",   lambda x: x.transpose(-1, -2),                [(2, 3, 4, 5)]),
    ("T",                         lambda x: x.T,                                [(3, 4)]),
    ("permute",                   lambda x: x.permute(1, 0, 2),                 [(2, 3, 4)]),
    # -- indexing --
    ("getitem-int",               lambda x: x[1],                               [(4, 5)]),
    ("getitem-slice",             lambda x: x[1:3],                             [(4, 5)]),
    ("getitem-slice-cols",        lambda x: x[:, 1:4],                          [(4, 5)]),
    ("getitem-step-and-int",      lambda x: x[::2, -1],                         [(4, 5)]),
    ("getitem-int-and-slice",     lambda x: x[1, 2:],                           [(4, 5)]),
    ("getitem-ellipsis",          lambda x: x[..., 0],                          [(2, 4, 5)]),
    ("getitem-newaxis",           lambda x: x[None, 1:],                        [(4, 5)]),
    ("getitem-int-array-repeats", lambda x: x[ix([0, 2, 0, 0])],                [(4, 5)]),
    ("getitem-2d-fancy",          lambda x: x[ix([[0, 1], [3, 0]])],            [(4, 5)]),
    ("getitem-paired-arrays",     lambda x: x[ix([0, 2, 0]), ix([1, 1, 4])],    [(4, 5)]),
    ("getitem-slice-and-array",   lambda x: x[:, ix([0, 0, 3])],                [(4, 5)]),
    # -- elementwise functions --
    ("exp",                       lambda x: x.exp(),                            [(3, 4)]),
    ("log",                       lambda x: x.log(),                            [(3, 4)], {"domain": "positive"}),
    ("tanh",                      lambda x: x.tanh(),                           [(3, 4)]),
    ("relu",                      lambda x: x.relu(),                           [(3, 4)], {"domain": "away0"}),
    ("where",                     lambda a, b: where(mask_34(), a, b),          [(3, 4), (3, 4)]),
    ("where-broadcast",           lambda a, b: where(mask_34(), a, b),          [(3, 4), (1, 4)]),
    ("where-constant",            lambda a: where(mask_34(), a, 0.0),           [(3, 4)]),
    ("masked_fill",               lambda x: x.masked_fill(causal_44(), 5.0),    [(4, 4)]),
    # -- joining and cutting --
    ("concat-axis0",              lambda a, b: concat([a, b], axis=0),          [(2, 3), (4, 3)]),
    ("concat-three-axis-1",       lambda a, b, c: concat([a, b, c], axis=-1),   [(2, 1), (2, 3), (2, 2)]),
    ("split-equal",               lambda x: weigh(split(x, 3, axis=0), axis=0), [(6, 2)]),
    ("split-index-list",          lambda x: weigh(split(x, [1, 3], axis=-1), -1), [(2, 5)]),
    ("split-one-part-used",       lambda x: split(x, 2, axis=1)[1],             [(3, 4)]),
    ("stack-axis0",               lambda a, b: stack([a, b], axis=0),           [(2, 3), (2, 3)]),
    ("stack-axis-1",              lambda a, b, c: stack([a, b, c], axis=-1),    [(2, 3), (2, 3), (2, 3)]),
    # -- functionals --
    ("gelu",                      F.gelu,                                       [(3, 4)]),
    ("gelu_erf",                  F.gelu_erf,                                   [(3, 4)]),
    ("gelu_erf-tails",            lambda x: F.gelu_erf(x * 4.0),                [(3, 4)]),  # |x| up to ~10
    ("linear-bias",               F.linear,                                     [(2, 3, 4), (4, 5), (5,)]),
    ("linear-no-bias",            F.linear,                                     [(3, 4), (4, 5)]),
    ("linear-frozen-weight",      F.linear,                                     [(2, 3, 4), (4, 5), (5,)],
     {"frozen": (1,)}),
    ("softmax-axis-1",            lambda x: F.softmax(x, axis=-1),              [(2, 3, 4)]),
    ("softmax-axis0",             lambda x: F.softmax(x, axis=0),               [(3, 4)]),
    ("log_softmax-axis-1",        lambda x: F.log_softmax(x, axis=-1),          [(2, 3, 4)]),
    ("log_softmax-axis0",         lambda x: F.log_softmax(x, axis=0),           [(3, 4)]),
    ("cross_entropy-2d",          lambda z: F.cross_entropy(z, ix([0, 3, 4, 1])), [(4, 5)]),
    ("cross_entropy-2d-ignore",   lambda z: F.cross_entropy(z, ix([0, -100, 4, -100])), [(4, 5)]),
    ("cross_entropy-3d",          lambda z: F.cross_entropy(z, ix([[0, 1, 4], [2, 2, 3]])), [(2, 3, 5)]),
    ("cross_entropy-3d-ignore",   lambda z: F.cross_entropy(z, ix([[0, -100, 4], [-100, 2, 2]])), [(2, 3, 5)]),
    ("cross_entropy-ignore-1",    lambda z: F.cross_entropy(z, ix([0, 1, 4, 1]), ignore_index=1), [(4, 5)]),
    ("cross_entropy-all-ignored", lambda z: F.cross_entropy(z, ix([-100, -100])), [(2, 5)]),
    ("soft_cross_entropy-2d",     lambda z: F.soft_cross_entropy(z, soft_45()), [(4, 5)]),
    ("soft_cross_entropy-3d",     lambda z: F.soft_cross_entropy(z, soft_45().reshape(2, 2, 5)), [(2, 2, 5)]),
    ("soft_cross_entropy-onehot", lambda z: F.soft_cross_entropy(z, ix(np.eye(5)[[0, 3, 4, 1]])), [(4, 5)]),
    ("layer_norm-weight-bias",    F.layer_norm,                                 [(2, 3, 5), (5,), (5,)]),
    ("layer_norm-weight-only",    lambda x, w: F.layer_norm(x, w, None),        [(4, 5), (5,)]),
    ("layer_norm-bias-only",      lambda x, b: F.layer_norm(x, None, b),        [(4, 5), (5,)]),
    ("layer_norm-none",           lambda x: F.layer_norm(x, None, None),        [(4, 5)]),
    ("layer_norm-frozen-x",       F.layer_norm,                                 [(4, 5), (5,), (5,)], {"frozen": (0,)}),
    ("dropout-eval",              lambda x: F.dropout(x, 0.3, False),           [(4, 5)]),
    ("dropout-train-fixed-mask",  lambda x: F.dropout(x, 0.3, True, backend.rng(0)), [(4, 5)]),
    ("embedding-repeated-ids",    lambda w: F.embedding(ix([[1, 1, 3], [0, 1, 3]]), w), [(5, 4)]),
    ("attention-composite",       attention,                                    [(2, 3, 4)] * 3),
    # -- lora.lora_linear (the lesson's op): y = x @ W + b + s·((x ⊙ keep) @ A) @ B; args x, W, A, B[, b] --
    ("lora_linear-bias",          lambda x, W, A, B, b: lora_linear(x, W, b, A, B, 1.5),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,)], {"frozen": (1, 4)}),
    ("lora_linear-no-bias",       lambda x, W, A, B: lora_linear(x, W, None, A, B, 0.5),
     [(3, 5), (5, 4), (5, 2), (2, 4)], {"frozen": (1,)}),
    ("lora_linear-dropout",       lambda x, W, A, B, b: lora_linear(x, W, b, A, B, 1.5, keep_235()),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,)], {"frozen": (1, 4)}),
    ("lora_linear-W-and-b-train", lambda x, W, A, B, b: lora_linear(x, W, b, A, B, 1.5, keep_235()),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,)]),
    ("lora_linear-x-frozen",      lambda x, W, A, B: lora_linear(x, W, None, A, B, 1.5),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4)], {"frozen": (0, 1)}),
    # -- lora.dora_linear (DoRA): y = (x @ V) ⊙ m/‖V‖_col + b, V = W + s·A·B; args x, W, A, B, m[, b] --
    ("dora_linear-bias",          lambda x, W, A, B, m, b: dora_linear(x, W, b, A, B, m, 1.5),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,), (4,)], {"frozen": (1, 5)}),
    ("dora_linear-no-bias",       lambda x, W, A, B, m: dora_linear(x, W, None, A, B, m, 0.5),
     [(3, 5), (5, 4), (5, 2), (2, 4), (4,)], {"frozen": (1,)}),
    ("dora_linear-dropout",       lambda x, W, A, B, m, b: dora_linear(x, W, b, A, B, m, 1.5, keep_235()),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,), (4,)], {"frozen": (1, 5)}),
    ("dora_linear-W-and-b-train", lambda x, W, A, B, m, b: dora_linear(x, W, b, A, B, m, 1.5, keep_235()),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,), (4,)]),
    ("dora_linear-x-frozen",      lambda x, W, A, B, m: dora_linear(x, W, None, A, B, m, 1.5),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,)], {"frozen": (0, 1)}),
    ("dora_linear-only-m-trains", lambda x, W, A, B, m: dora_linear(x, W, None, A, B, m, 1.5),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,)], {"frozen": (0, 1, 2, 3)}),
    # -- fused.fused_linear: LinearParts (W, b, A, B, s, keep) that share x, as q, k, v do --
    ("fused_linear-three-plain",  lambda x, W1, W2, W3, b1, b3: fused_linear(
        x, [LinearPart(W1, b1), LinearPart(W2), LinearPart(W3, b3)]),
     [(2, 3, 5), (5, 4), (5, 2), (5, 3), (4,), (3,)]),
    ("fused_linear-three-lora",   lambda x, W1, W2, W3, A1, A2, A3, B1, B2, B3: fused_linear(
        x, [LinearPart(W1, None, A1, B1, 1.5), LinearPart(W2, None, A2, B2, 0.5), LinearPart(W3, None, A3, B3, 2.0)]),
     [(2, 3, 5), (5, 4), (5, 4), (5, 3), (5, 2), (5, 2), (5, 1), (2, 4), (2, 4), (1, 3)], {"frozen": (1, 2, 3)}),
    ("fused_linear-lora-W-trains", lambda x, W1, W2, A1, B1, A2, B2, b2: fused_linear(
        x, [LinearPart(W1, None, A1, B1, 1.5), LinearPart(W2, b2, A2, B2, 0.5)]),
     [(2, 3, 5), (5, 4), (5, 3), (5, 2), (2, 4), (5, 2), (2, 3), (3,)]),
    ("fused_linear-dropout-and-plain", lambda x, W1, A1, B1, b1, W2: fused_linear(
        x, [LinearPart(W1, b1, A1, B1, 1.5, keep_235()), LinearPart(W2)]),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (4,), (5, 3)], {"frozen": (1, 5)}),
    ("fused_linear-x-frozen",     lambda x, W1, A1, B1, W2, A2, B2: fused_linear(
        x, [LinearPart(W1, None, A1, B1, 1.5), LinearPart(W2, None, A2, B2, 0.5, keep_235())]),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4), (5, 3), (5, 1), (1, 3)], {"frozen": (0, 1, 4)}),
    # -- a 4-bit frozen W (qlora.QuantizedWeight) under the same ops: dx through the dequantized W, no dW --
    ("qlora-linear",              lambda x, W, b: F.linear(x, nf4(W), b),       [(2, 3, 4), (4, 5), (5,)],
     {"frozen": (1,)}),
    ("qlora-lora_linear",         lambda x, W, b, A, B: lora_linear(x, nf4(W), b, A, B, 1.5),
     [(2, 3, 5), (5, 4), (4,), (5, 2), (2, 4)], {"frozen": (1,)}),
    ("qlora-lora_linear-dropout", lambda x, W, A, B: lora_linear(x, nf4(W), None, A, B, 1.5, keep_235()),
     [(2, 3, 5), (5, 4), (5, 2), (2, 4)], {"frozen": (1,)}),
    ("qlora-fused_linear-qkv",    lambda x, W1, W2, W3, A1, B1, A3, B3: fused_linear(
        x, [LinearPart(nf4(W1), None, A1, B1, 1.5), LinearPart(nf4(W2), None), LinearPart(nf4(W3), None, A3, B3, 0.5)]),
     [(2, 3, 5), (5, 4), (5, 4), (5, 4), (5, 2), (2, 4), (5, 1), (1, 4)], {"frozen": (1, 2, 3)}),
    # -- multi_adapter.multi_lora_linear: K = 3 stacked adapters; sample i uses ids[i] (1 twice, 2 never) --
    ("multi_lora_linear",         lambda x, W, b, A, B: multi_lora_linear(
        x, W, b, A, B, ix([1.5, 0.5, 2.0]), ix([1, 0, 1])),
     [(3, 4, 5), (5, 4), (4,), (3, 5, 2), (3, 2, 4)], {"frozen": (1,)}),
    ("multi_lora_linear-W-trains-2d", lambda x, W, A, B: multi_lora_linear(
        x, W, None, A, B, ix([1.5, 0.5]), ix([1, 1, 0, 1])),
     [(4, 5), (5, 3), (2, 5, 3), (2, 3, 3)]),
    ("multi_lora_linear-4bit-x-frozen", lambda x, W, A, B: multi_lora_linear(
        x, nf4(W), None, A, B, ix([1.5, 0.5, 2.0]), ix([2, 0])),
     [(2, 3, 5), (5, 4), (3, 5, 2), (3, 2, 4)], {"frozen": (0, 1)}),
    ("causal_attention-2-heads",  lambda qkv: F.causal_attention(qkv, 2),      [(2, 4, 12)]),
    ("causal_attention-1-head",   lambda qkv: F.causal_attention(qkv, 1),      [(1, 5, 9)]),
]  # fmt: skip

# Every op of the engine, by the prefix its rows' names start with (a new op without a row fails the test below).
ENGINE_OPS = ["add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "pow", "neg", "matmul", "sum", "mean",
              "max", "reshape", "transpose", "T", "permute", "getitem", "exp", "log", "tanh", "relu", "where",
              "masked_fill", "concat", "split", "stack"]
LINEAR_OPS = ["lora_linear", "dora_linear", "fused_linear"]  # the lesson's LoRA and DoRA ops (lora.py), the fast one


@pytest.mark.parametrize(
    "fn, shapes, extra",
    [pytest.param(fn, shapes, extra[0] if extra else {}, id=name) for name, fn, shapes, *extra in CASES],
)
def test_gradcheck_every_op(backend, rand, fn, shapes, extra):
    frozen = extra.get("frozen", ())
    inputs = [rand(*s, domain=extra.get("domain", "real"), requires_grad=i not in frozen) for i, s in enumerate(shapes)]
    result = gradcheck(fn, *inputs)  # raises GradcheckError, naming the worst element, above tol=1e-6
    assert result.max_error <= 1e-6
    assert all(inputs[i].grad is None for i in frozen)  # a frozen input never receives a gradient


def test_table_covers_every_op_and_functional():
    names = [name for name, *_ in CASES]
    for op in ENGINE_OPS + LINEAR_OPS + list(F.__all__):
        assert any(n == op or n.startswith(op + "-") for n in names), f"no gradcheck row for {op!r}"


# -- gradcheck itself ------------------------------------------------------------------------------------------


def wrong_at(element):
    """f(x) = x whose backward doubles the gradient of one ``element`` only: a planted bug gradcheck must find."""

    def fn(x):
        onehot = backend.xp.zeros(x.shape)
        onehot[element] = 1.0
        return Tensor.from_op(x.data, (x,), "bad", lambda g: (g * (1.0 + onehot),))

    return fn


def test_a_wrong_backward_fails_naming_the_input_and_element(rand):
    bad = wrong_at((1, 2))
    with pytest.raises(GradcheckError, match=re.escape("at input 1, element (1, 2)")):
        gradcheck(lambda a, b: a * 3.0 + bad(b), rand(3, 4), rand(3, 4))


def test_a_wrong_backward_everywhere_fails(rand):
    with pytest.raises(GradcheckError, match=r"at input 0, element \(\d+, \d+\): analytic"):
        gradcheck(lambda x: Tensor.from_op(x.data, (x,), "bad", lambda g: (2 * g,)), rand(3, 4))


def test_gradcheck_error_is_an_assertion_error():
    assert issubclass(GradcheckError, AssertionError)  # so pytest reports it as a failed check


def test_raise_on_fail_false_returns_the_worst_element(rand):
    result = gradcheck(lambda a, b: a + wrong_at((2, 0))(b), rand(3, 4), rand(3, 4), raise_on_fail=False)
    assert isinstance(result, GradcheckResult)
    assert result.max_error > 1e-6
    assert (result.input_index, result.element) == (1, (2, 0))
    assert result.numeric == pytest.approx(result.analytic / 2, rel=1e-6)  # the planted bug doubled it
    assert "at input 1, element (2, 0)" in str(result)


def test_a_correct_op_passes_with_a_tiny_error(rand):
    result = gradcheck(lambda x, y: (x * y).tanh(), rand(3, 4), rand(3, 4))
    assert result.max_error < 1e-8


def test_tol_is_respected(rand):
    bad, x = wrong_at((0, 0)), rand(2, 2)
    error = gradcheck(bad, x, raise_on_fail=False).max_error
    assert gradcheck(bad, x, tol=1.01 * error).max_error == error
    with pytest.raises(GradcheckError):
        gradcheck(bad, x, tol=0.99 * error)


def test_inputs_are_left_unchanged(rand):
    x = rand(3, 4)
    before = x.numpy().copy()
    gradcheck(lambda t: t.exp(), x)
    np.testing.assert_array_equal(x.numpy(), before)


def test_non_contiguous_input_is_really_nudged():
    # Regression: a transposed (non-contiguous) input used to be nudged through a reshape copy, so the numeric
    # gradient was 0 everywhere and a backward returning zeros passed.
    data = np.random.default_rng(0).standard_normal((4, 3)).T
    x = Tensor(data, requires_grad=True, dtype=np.float64)
    assert not x.data.flags.c_contiguous
    assert gradcheck(lambda t: t * t, x).max_error < 1e-8
    with pytest.raises(GradcheckError):
        gradcheck(lambda t: Tensor.from_op(t.data * 1.0, (t,), "bad", lambda g: (g * 0.0,)), x)  # a zero backward


def test_frozen_inputs_are_not_checked(rand):
    x, c = rand(3), rand(3, requires_grad=False)
    result = gradcheck(lambda a, b: a * b, x, c)
    assert result.input_index == 0
    assert c.grad is None


def test_float32_inputs_are_refused():
    x = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match=r"input 0 has dtype float32; use float64"):
        gradcheck(lambda t: t * 2.0, x)


def test_no_input_requiring_grad_is_refused(rand):
    with pytest.raises(ValueError, match="no input requires_grad"):
        gradcheck(lambda t: t * 2.0, rand(2, 2, requires_grad=False))
