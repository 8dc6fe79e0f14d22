"""Tests for lora_np/optim.py: updates checked against independent float64 references of the documented
algorithms (PyTorch's SGD and AdamW pseudocode), plus clipping, the schedule, and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np.engine import Tensor
from lora_np.optim import SGD, AdamW, clip_grad_norm, cosine_lr

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def make_params(seed: int = 0, dtype=np.float64) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in SHAPES]


def grad_sequence(n_steps: int, seed: int = 1) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(n_steps)]


def reference_adamw(p0, grads, lr, beta1, beta2, eps, wd):
    """PyTorch's documented AdamW algorithm (torch.optim.AdamW), one parameter, written as a plain loop."""
    theta = p0.astype(np.float64).copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta - lr * wd * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def reference_sgd(p0, grads, lr, momentum, wd):
    """PyTorch's documented SGD algorithm (dampening 0, no Nesterov), one parameter, as a plain loop."""
    theta = p0.astype(np.float64).copy()
    b = None
    for g in grads:
        g = g + wd * theta
        if momentum != 0:
            b = g.copy() if b is None else momentum * b + g
            g = b
        theta = theta - lr * g
    return theta


def run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.copy()
        opt.step()


# -- AdamW ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_reference(wd):
    params = make_params()
    p0 = [p.data.copy() for p in params]
    grads = grad_sequence(6)
    hp = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    run(AdamW(params, **hp), params, grads)
    for i, p in enumerate(params):
        expected = reference_adamw(p0[i], [g[i] for g in grads], 0.05, 0.8, 0.95, 1e-6, wd)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.999),
    wd=st.floats(0.0, 0.5),
    n_steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_adamw_matches_reference_property(lr, beta1, beta2, wd, n_steps, seed):
    params = make_params(seed)
    p0 = [p.data.copy() for p in params]
    grads = grad_sequence(n_steps, seed + 1)
    run(AdamW(params, lr=lr, betas=(beta1, beta2), eps=1e-8, weight_decay=wd), params, grads)
    for i, p in enumerate(params):
        expected = reference_adamw(p0[i], [g[i] for g in grads], lr, beta1, beta2, 1e-8, wd)
        np.testing.assert_allclose(p.data, expected, rtol=1e-10, atol=1e-12)


def test_adamw_first_step_is_lr_times_sign():
    # With bias correction, step 1 gives m̂ = g and v̂ = g², so the move is lr·g/(|g|+eps) ≈ lr·sign(g)
    # regardless of the gradient's scale (Kingma & Ba §2): a check of the bias correction on its own.
    p = Tensor(np.zeros(4), requires_grad=True)
    p.grad = np.array([1e-3, -5.0, 2e2, -1e-2])
    AdamW([p], lr=0.1, eps=0.0, weight_decay=0.0).step()
    np.testing.assert_allclose(p.data, -0.1 * np.sign(p.grad), rtol=1e-12)


def test_adamw_decay_is_decoupled():
    # With a zero gradient Adam's term is 0 (m = 0), so only decoupled decay acts: p ← (1 - lr·wd) p.
    # L2 decay added to the gradient would instead move p by about lr·sign(p).
    p = Tensor(np.array([2.0, -4.0]), requires_grad=True)
    p.grad = np.zeros(2)
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.data, [2.0 * 0.95, -4.0 * 0.95], rtol=1e-12)


def test_adamw_keeps_float32():
    params = make_params(dtype=np.float32)
    run(AdamW(params, lr=1e-2), params, grad_sequence(2))
    assert all(p.data.dtype == np.float32 for p in params)


def test_adamw_minimises_quadratic():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((4, 3))
    p = Tensor(np.zeros((4, 3)), requires_grad=True)
    opt = AdamW([p], lr=0.05, weight_decay=0.0)
    for _ in range(500):
        opt.zero_grad()
        loss = ((p - Tensor(target)) ** 2).sum()  # ||p - t||², gradient through the engine
        loss.backward()
        opt.step()
    np.testing.assert_allclose(p.data, target, atol=1e-3)


def test_adamw_state_is_two_times_trainable_bytes():
    params = make_params(dtype=np.float32)
    opt = AdamW(params)
    assert opt.state_nbytes() == 0  # lazily allocated
    run(opt, params, grad_sequence(1))
    assert opt.state_nbytes() == 2 * sum(p.data.nbytes for p in params)


# -- SGD -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05), (0.0, 0.05)])
def test_sgd_matches_reference(momentum, wd):
    params = make_params()
    p0 = [p.data.copy() for p in params]
    grads = grad_sequence(5)
    run(SGD(params, lr=0.1, momentum=momentum, weight_decay=wd), params, grads)
    for i, p in enumerate(params):
        expected = reference_sgd(p0[i], [g[i] for g in grads], 0.1, momentum, wd)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_sgd_weight_decay_does_not_modify_grad():
    p = Tensor(np.ones(3), requires_grad=True)
    p.grad = np.full(3, 0.5)
    SGD([p], lr=0.1, weight_decay=0.1).step()
    np.testing.assert_array_equal(p.grad, np.full(3, 0.5))


def test_sgd_state_nbytes():
    params = make_params(dtype=np.float32)
    plain = SGD(params, lr=0.1)
    run(plain, params, grad_sequence(1))
    assert plain.state_nbytes() == 0  # no momentum, no buffer
    heavy = SGD(params, lr=0.1, momentum=0.9)
    run(heavy, params, grad_sequence(1))
    assert heavy.state_nbytes() == sum(p.data.nbytes for p in params)


# -- shared behaviour ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt, buffers_per_param",
    [(lambda ps: AdamW(ps, lr=0.1), 2), (lambda ps: SGD(ps, lr=0.1, momentum=0.9), 1)],
)
def test_update_is_in_place_and_skips_missing_grads(make_opt, buffers_per_param):
    params = make_params()
    arrays = [p.data for p in params]
    before = [a.copy() for a in arrays]
    opt = make_opt(params)
    params[0].grad = np.ones(SHAPES[0])
    params[2].grad = np.ones(SHAPES[2])  # params[1].grad stays None
    opt.step()
    assert all(p.data is a for p, a in zip(params, arrays, strict=True))  # same array objects
    assert not np.allclose(params[0].data, before[0])
    np.testing.assert_array_equal(params[1].data, before[1])  # untouched
    assert opt.state[1] == {}  # and no state allocated (AdamW's step count not advanced)
    assert opt.state_nbytes() == buffers_per_param * (params[0].data.nbytes + params[2].data.nbytes)


def test_adamw_step_count_is_per_parameter():
    # A parameter that misses a step keeps its own bias-correction clock, as in PyTorch.
    a, b = Tensor(np.zeros(2), requires_grad=True), Tensor(np.zeros(2), requires_grad=True)
    opt = AdamW([a, b], lr=0.1)
    a.grad = np.ones(2)
    opt.step()
    a.grad = b.grad = np.ones(2)
    opt.step()
    assert opt.state[0]["step"] == 2 and opt.state[1]["step"] == 1


def test_zero_grad_sets_none():
    params = make_params()
    for p in params:
        p.grad = np.ones_like(p.data)
    opt = SGD(params, lr=0.1)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step()  # nothing to do, nothing changes


def test_lr_is_public_and_used():
    p = Tensor(np.zeros(1), requires_grad=True)
    opt = SGD([p], lr=1.0)
    opt.lr = 0.25
    p.grad = np.ones(1)
    opt.step()
    np.testing.assert_allclose(p.data, [-0.25])


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_rejects_frozen_empty_duplicate_and_single_tensor(cls):
    trainable = Tensor(np.zeros(2), requires_grad=True)
    frozen = Tensor(np.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        cls([trainable, frozen], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        cls([], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        cls([trainable, trainable], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        cls(trainable, lr=0.1)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: SGD(ps, lr=-1.0),
        lambda ps: SGD(ps, lr=0.1, momentum=-0.5),
        lambda ps: SGD(ps, lr=0.1, weight_decay=float("nan")),
        lambda ps: AdamW(ps, lr=-1e-3),
        lambda ps: AdamW(ps, betas=(1.0, 0.999)),
        lambda ps: AdamW(ps, betas=(0.9, -0.1)),
        lambda ps: AdamW(ps, eps=-1e-8),
        lambda ps: AdamW(ps, weight_decay=-0.01),
    ],
)
def test_bad_hyperparameters_rejected(make_opt):
    with pytest.raises(ValueError):
        make_opt([Tensor(np.zeros(2), requires_grad=True)])


# -- clip_grad_norm ------------------------------------------------------------------------------------------------


def test_clip_grad_norm_scales_to_max_norm():
    params = make_params()
    grads = grad_sequence(1)[0]
    for p, g in zip(params, grads, strict=True):
        p.grad = 10 * g
    expected_norm = math.sqrt(sum(float(np.sum((10 * g) ** 2)) for g in grads))
    grad_arrays = [p.grad for p in params]
    norm = clip_grad_norm(params, max_norm=1.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    new_norm = math.sqrt(sum(float(np.sum(p.grad**2)) for p in params))
    assert new_norm == pytest.approx(1.0, rel=1e-12)
    assert all(p.grad is a for p, a in zip(params, grad_arrays, strict=True))  # scaled in place
    for p, g in zip(params, grads, strict=True):  # direction kept: one common factor
        np.testing.assert_allclose(p.grad, 10 * g / expected_norm, rtol=1e-12)


def test_clip_grad_norm_leaves_small_grads_and_skips_none():
    a, b = Tensor(np.zeros(2), requires_grad=True), Tensor(np.zeros(3), requires_grad=True)
    a.grad = np.array([0.3, 0.4])  # norm 0.5; b.grad is None
    assert clip_grad_norm([a, b], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(a.grad, [0.3, 0.4])
    assert b.grad is None
    assert clip_grad_norm([b], max_norm=1.0) == 0.0


def test_clip_grad_norm_non_finite_is_returned_unscaled():
    p = Tensor(np.zeros(3), requires_grad=True)
    p.grad = np.array([1.0, np.inf, 2.0])
    assert math.isinf(clip_grad_norm([p], max_norm=1.0))
    np.testing.assert_array_equal(p.grad, [1.0, np.inf, 2.0])
    p.grad = np.array([1.0, np.nan, 2.0])
    assert math.isnan(clip_grad_norm([p], max_norm=1.0))


def test_clip_grad_norm_rejects_negative_max_norm():
    with pytest.raises(ValueError):
        clip_grad_norm([Tensor(np.zeros(1), requires_grad=True)], max_norm=-1.0)


# -- cosine_lr -----------------------------------------------------------------------------------------------------


def test_cosine_lr_values():
    kw = dict(max_lr=1.0, max_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)  # peak at the end of warmup
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # halfway through decay: the mean of max and min
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(1000, **kw) == 0.1
    assert cosine_lr(0, max_lr=1.0, max_steps=10) == 1.0  # no warmup: start at the peak


def test_cosine_lr_warmup_rises_then_decays_monotonically():
    lrs = [cosine_lr(s, max_lr=3e-4, max_steps=200, warmup_steps=20, min_lr=3e-5) for s in range(250)]
    assert all(x < y for x, y in zip(lrs[:20], lrs[1:21], strict=True))
    assert all(x >= y for x, y in zip(lrs[20:], lrs[21:], strict=False))
    assert min(lrs) == 0.0 and max(lrs) == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "step, kw",
    [
        (-1, dict(max_lr=1.0, max_steps=10)),
        (0, dict(max_lr=1.0, max_steps=0)),
        (0, dict(max_lr=1.0, max_steps=10, warmup_steps=11)),
        (0, dict(max_lr=1.0, max_steps=10, warmup_steps=-1)),
        (0, dict(max_lr=1.0, max_steps=10, min_lr=2.0)),
        (0, dict(max_lr=1.0, max_steps=10, min_lr=-0.1)),
        (0, dict(max_lr=float("nan"), max_steps=10)),
    ],
)
def test_cosine_lr_bad_args(step, kw):
    with pytest.raises(ValueError):
        cosine_lr(step, **kw)
