"""Tests for lora_np/functional.py: forward values against plain NumPy formulas, numerical stability at extreme
logits, dropout statistics, frozen inputs, and error messages. Gradients are checked by the table in
test_gradcheck.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import lora_np.functional as F
from lora_np import backend as lora_backend
from lora_np.engine import Tensor


def dev(backend, a) -> Tensor:
    """A float64 Tensor on the active backend, requiring grad, from host data."""
    return Tensor(backend.to_device(np.asarray(a, dtype=np.float64)), requires_grad=True)


def host(x) -> np.ndarray:
    return lora_backend.to_numpy(x.data if isinstance(x, Tensor) else x)


def np_softmax(z, axis=-1):  # the textbook formula, fine for moderate z
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# -- forward values against NumPy formulas ---------------------------------------------------------------------


def test_gelu_is_the_tanh_formula(backend, rand):
    x = rand(4, 5)
    a = host(x)
    expected = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    np.testing.assert_allclose(host(F.gelu(x)), expected, rtol=1e-12)
    exact = 0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))  # the erf GELU it approximates
    np.testing.assert_allclose(host(F.gelu(x)), exact, atol=1e-3)


def test_gelu_erf_is_x_times_the_normal_cdf(backend):
    a = np.linspace(-8.0, 8.0, 4001)  # the whole range where GELU is neither 0 nor x to float precision
    exact = 0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
    got = host(F.gelu_erf(dev(backend, a)))
    assert np.abs(got - exact).max() < 3e-8  # measured 1.4e-8 (erfc with fractional error < 1.2e-7)
    assert np.abs(got - host(F.gelu(dev(backend, a)))).max() > 1e-4  # and it is not the tanh approximation
    x32 = Tensor(backend.to_device(a.astype(np.float32)))
    assert F.gelu_erf(x32).dtype == np.float32  # float32 in, float32 out


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax(backend, rand, axis):
    x = rand(3, 4)
    y = host(F.softmax(x, axis=axis))
    np.testing.assert_allclose(y, np_softmax(host(x), axis), rtol=1e-12)
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)


@pytest.mark.parametrize("axis", [-1, 1])
def test_log_softmax(backend, rand, axis):
    x = rand(2, 3, 4)
    np.testing.assert_allclose(host(F.log_softmax(x, axis=axis)), np.log(np_softmax(host(x), axis)), rtol=1e-12)


def reference_cross_entropy(z, t, ignore_index=-100):
    """-mean over the counted positions of log softmax(z)[target], directly."""
    z, t = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    keep = t != ignore_index
    logp = np.log(np_softmax(z[keep]))
    return -logp[np.arange(keep.sum()), t[keep]].mean()


@pytest.mark.parametrize(
    "shape, targets",
    [
        ((4, 5), [0, 3, 4, 1]),
        ((4, 5), [0, -100, 4, -100]),
        ((2, 3, 5), [[0, 1, 4], [2, 2, 3]]),
        ((2, 3, 5), [[0, -100, 4], [-100, 2, 2]]),
    ],
    ids=["2d", "2d-ignore", "3d", "3d-ignore"],
)
def test_cross_entropy_is_mean_negative_log_likelihood(backend, rand, shape, targets):
    z, t = rand(*shape), np.array(targets)
    loss = F.cross_entropy(z, t)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(reference_cross_entropy(host(z), t), rel=1e-12)


def test_cross_entropy_custom_ignore_index_and_tensor_targets(backend, rand):
    z, t = rand(4, 5), np.array([0, 1, 4, 1])
    loss = F.cross_entropy(z, Tensor(backend.to_device(t)), ignore_index=1)
    assert loss.item() == pytest.approx(reference_cross_entropy(host(z), t, ignore_index=1), rel=1e-12)


def test_soft_cross_entropy_is_kl_plus_entropy_and_equals_cross_entropy_on_one_hot(backend, rand):
    z = rand(2, 3, 5)
    p = np.random.default_rng(1).random((2, 3, 5))
    p /= p.sum(-1, keepdims=True)
    logq = np.log(np_softmax(host(z)))
    kl = (p * (np.log(p) - logq)).sum(-1).mean()
    entropy = -(p * np.log(p)).sum(-1).mean()
    assert F.soft_cross_entropy(z, p).item() == pytest.approx(kl + entropy, rel=1e-12)
    t = np.array([[0, 4, 2], [1, 1, 3]])
    assert F.soft_cross_entropy(z, np.eye(5)[t]).item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-12)


def test_soft_cross_entropy_gradient_is_q_minus_p_and_vanishes_at_the_target(backend, rand):
    z, p = rand(4, 5), np.full((4, 5), 0.2)
    F.soft_cross_entropy(z, p).backward()
    np.testing.assert_allclose(host(z.grad), (np_softmax(host(z)) - p) / 4, rtol=1e-12, atol=1e-15)
    z0 = dev(backend, np.log(p))  # logits equal to log p: the minimum
    F.soft_cross_entropy(z0, p).backward()
    np.testing.assert_allclose(host(z0.grad), 0.0, atol=1e-15)


def test_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient(backend, rand):
    z = rand(2, 5)
    loss = F.cross_entropy(z, np.array([-100, -100]))
    loss.backward()
    assert loss.item() == 0.0
    np.testing.assert_array_equal(host(z.grad), np.zeros((2, 5)))


def test_cross_entropy_gradient_is_softmax_minus_onehot(backend, rand):
    z, t = rand(3, 4), np.array([1, -100, 3])
    F.cross_entropy(z, t).backward()
    expected = np_softmax(host(z)) - np.eye(4)[np.where(t < 0, 0, t)]
    expected[1] = 0.0  # the ignored row
    np.testing.assert_allclose(host(z.grad), expected / 2, rtol=1e-12)  # averaged over the 2 counted rows


@pytest.mark.parametrize("with_weight, with_bias", [(True, True), (True, False), (False, False)],
                         ids=["weight-bias", "weight-only", "none"])
def test_layer_norm(backend, rand, with_weight, with_bias):
    x = rand(2, 3, 6)
    w, b = rand(6) if with_weight else None, rand(6) if with_bias else None
    a = host(x)
    expected = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)
    if with_weight:
        expected = expected * host(w)
    if with_bias:
        expected = expected + host(b)
    np.testing.assert_allclose(host(F.layer_norm(x, w, b)), expected, rtol=1e-10, atol=1e-12)


def test_layer_norm_without_affine_has_zero_mean_unit_variance(backend, rand):
    y = host(F.layer_norm(rand(4, 64), None, None, eps=0.0))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-10)


def test_embedding_picks_rows(backend, rand):
    w, ids = rand(5, 3), np.array([[1, 1, 4], [0, 2, 1]])
    out = F.embedding(ids, w)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(host(out), host(w)[ids])


def test_embedding_gradient_adds_up_repeated_ids(backend, rand):
    w, ids = rand(5, 3), np.array([[1, 1, 4], [0, 2, 1]])
    F.embedding(ids, w).sum().backward()
    counts = np.bincount(ids.ravel(), minlength=5)  # row 1 is used 3 times, row 3 never
    np.testing.assert_array_equal(host(w.grad), np.repeat(counts[:, None], 3, axis=1).astype(float))


# -- dropout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_about_p_and_scales_the_rest(backend, p):
    x = dev(backend, np.random.default_rng(1).uniform(1, 2, size=(400, 500)))
    y = host(F.dropout(x, p, True, backend.rng(0)))
    dropped = y == 0
    assert dropped.mean() == pytest.approx(p, abs=0.005)  # 200,000 draws: the standard error is ~0.001
    np.testing.assert_allclose(y[~dropped], host(x)[~dropped] / (1 - p), rtol=1e-12)  # inverted dropout
    assert y.mean() == pytest.approx(host(x).mean(), rel=0.01)  # ... so the expectation is unchanged


def test_dropout_same_seed_same_mask_and_gradient_is_the_mask(backend, rand):
    x = rand(20, 30)
    y1, y2 = F.dropout(x, 0.3, True, backend.rng(7)), F.dropout(x, 0.3, True, backend.rng(7))
    np.testing.assert_array_equal(host(y1), host(y2))
    assert not np.array_equal(host(y1), host(F.dropout(x, 0.3, True, backend.rng(8))))
    y1.sum().backward()
    np.testing.assert_allclose(host(x.grad), (host(y1) != 0) / 0.7, rtol=1e-12)


@pytest.mark.parametrize("p, training", [(0.3, False), (0.0, True)], ids=["eval", "p=0"])
def test_dropout_identity(backend, rand, p, training):
    x = rand(3, 4)
    assert F.dropout(x, p, training, backend.rng(0)) is x


def test_dropout_keeps_float32(backend):
    x = Tensor(backend.to_device(np.ones((4, 4), dtype=np.float32)), requires_grad=True)
    assert F.dropout(x, 0.5, True, backend.rng(0)).dtype == np.float32


# -- numerical stability at extreme logits ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_is_stable_at_huge_logits(backend, dtype):
    z = Tensor(backend.to_device(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=dtype)), requires_grad=True)
    s = F.softmax(z)
    np.testing.assert_allclose(host(s), [[1, 0, 0], [0, 0.5, 0.5]], atol=1e-7)
    ls = F.log_softmax(z)
    np.testing.assert_allclose(host(ls), [[0, -2e4, -1e4], [-2e4 - np.log(2), -np.log(2), -np.log(2)]], rtol=1e-6)
    (s.sum() + ls.sum()).backward()
    assert np.isfinite(host(z.grad)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_at_huge_logits(backend, dtype):
    z = Tensor(backend.to_device(np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype=dtype)), requires_grad=True)
    loss = F.cross_entropy(z, np.array([0, 1]))  # one right with certainty (0), one wrong by 2e4
    assert np.isfinite(loss.item())
    assert loss.item() == pytest.approx((0 + 2e4) / 2, rel=1e-6)
    loss.backward()
    g = host(z.grad)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, [[0, 0, 0], [0.5, -0.5, 0]], atol=1e-7)


# -- frozen inputs ---------------------------------------------------------------------------------------------


@pytest.fixture
def scatter_adds(monkeypatch) -> list[tuple]:
    """Counts the calls of backend.scatter_add (the embedding backward's one allocation-and-scatter)."""
    calls: list[tuple] = []
    real = lora_backend.scatter_add

    def counting(target, index, values):
        calls.append(target.shape)
        return real(target, index, values)

    monkeypatch.setattr(lora_backend, "scatter_add", counting)
    return calls


def test_embedding_of_a_frozen_table_records_nothing(backend, rand, scatter_adds):
    w, h = rand(5, 3, requires_grad=False), rand(2, 3)
    out = F.embedding(np.array([1, 4]), w)
    assert not out.requires_grad and out._parents == ()
    (out * h).sum().backward()  # h needs a gradient, the table does not
    assert w.grad is None
    assert scatter_adds == []  # the backward closure never ran: no (V, C) gradient array was allocated
    np.testing.assert_array_equal(host(h.grad), host(w)[[1, 4]])


def test_embedding_of_a_trainable_table_scatters_once(backend, rand, scatter_adds):
    w = rand(5, 3)
    F.embedding(np.array([1, 4, 1]), w).sum().backward()
    assert scatter_adds == [(5, 3)]


def test_layer_norm_with_frozen_affine_gives_it_no_gradient(backend, rand):
    x, w, b = rand(2, 4), rand(4, requires_grad=False), rand(4, requires_grad=False)
    F.layer_norm(x, w, b).sum().backward()
    assert w.grad is None and b.grad is None and x.grad is not None


# -- bad input: each error names the problem -------------------------------------------------------------------


def logits(*shape):
    return Tensor(np.zeros(shape), requires_grad=True)


def ce(targets, logits_shape=None):
    """cross_entropy of ``targets`` against zero logits of ``logits_shape`` (default: targets.shape + (5,))."""
    targets = np.asarray(targets)
    return F.cross_entropy(logits(*(logits_shape or (*targets.shape, 5))), targets)


def emb(ids, V=5):
    """embedding of ``ids`` in a zero table (V, 3)."""
    return F.embedding(np.asarray(ids), logits(V, 3))


ERRORS = [
    # name             call                                      error       message (a literal part of it)
    ("ce-shape",       lambda: ce([0, 1, 2], (4, 5)),            ValueError, "shape (3,) for logits of shape (4, 5)"),
    ("ce-high",        lambda: ce([0, 5]),                       ValueError, "targets outside [0, 5)"),
    ("ce-neg",         lambda: ce([0, -1]),                      ValueError, "targets outside [0, 5)"),
    ("ce-float",       lambda: ce([0.0, 1.0]),                   TypeError,  "targets must be integers"),
    ("soft-shape",     lambda: F.soft_cross_entropy(logits(4, 5), np.full((4, 4), 0.25)),
                                                                 ValueError, "probs of shape (4, 4) for logits"),
    ("soft-int",       lambda: F.soft_cross_entropy(logits(2, 2), np.eye(2, dtype=int)),
                                                                 TypeError,  "probs must be floating point"),
    ("soft-unnormed",  lambda: F.soft_cross_entropy(logits(2, 2), np.ones((2, 2))),
                                                                 ValueError, "must be non-negative and sum to 1"),
    ("soft-negative",  lambda: F.soft_cross_entropy(logits(1, 2), np.array([[1.5, -0.5]])),
                                                                 ValueError, "must be non-negative and sum to 1"),
    ("emb-id-high",    lambda: emb([0, 7]),                      ValueError, "ids in [0, 7] but the table has 5 rows"),
    ("emb-id-neg",     lambda: emb([-1, 2]),                     ValueError, "ids in [-1, 2] but the table has 5 rows"),
    ("emb-float-ids",  lambda: emb([0.0, 1.0]),                  TypeError,  "ids must be integers"),
    ("dropout-p=1",    lambda: F.dropout(logits(3), 1.0, True),  ValueError, "p must be in [0, 1), got 1.0"),
    ("dropout-p<0",    lambda: F.dropout(logits(3), -0.1, True), ValueError, "p must be in [0, 1), got -0.1"),
    ("dropout-p-eval", lambda: F.dropout(logits(3), 1.5, False), ValueError, "p must be in [0, 1), got 1.5"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", [pytest.param(*row[1:], id=row[0]) for row in ERRORS])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
