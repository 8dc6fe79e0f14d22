"""Tests for lora_np/engine.py: forward values against NumPy, gradients against independent formulas (hypothesis
over random shapes, broadcasting included), graph semantics, frozen inputs, no_grad, dtypes and error messages.

Every op's backward is also checked numerically by the table in test_gradcheck.py.
"""

from __future__ import annotations

import operator
import re

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_np
from lora_np import engine
from lora_np.engine import Tensor, concat, is_grad_enabled, no_grad, split, stack, unbroadcast, where

PROPERTY = settings(max_examples=30, deadline=None)  # modest: the whole suite must stay fast
FLOATS = st.floats(-10, 10, allow_subnormal=False)


def sum_to_shape(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of broadcasting ``shape`` up to ``g.shape``, written independently of ``engine.unbroadcast``:
    every element of ``g`` is added into the input element it was copied from."""
    size = int(np.prod(shape))
    source = np.broadcast_to(np.arange(size).reshape(shape), g.shape)  # which input element fed each output
    return np.bincount(source.ravel(), weights=g.ravel(), minlength=size).reshape(shape)


def tensor(backend, a, requires_grad=True) -> Tensor:
    """A float64 Tensor on the active backend from host data."""
    return Tensor(backend.to_device(np.asarray(a, dtype=np.float64)), requires_grad=requires_grad)


def dev(a):
    """Host array -> array of the active backend (indices and masks built at call time)."""
    return lora_np.backend.to_device(a)


def host(x) -> np.ndarray:
    """Tensor or array -> host NumPy array."""
    return lora_np.backend.to_numpy(x.data if isinstance(x, Tensor) else x)


# -- forward values against NumPy ------------------------------------------------------------------------------

MASK = np.arange(12).reshape(3, 4) % 3 == 0
IDX = np.array([0, 2, 0, 0])

SAME = None  # the NumPy version is the same expression

FORWARD = [
    # name             input shapes      Tensor version                          NumPy version
    ("neg",            [(3, 4)],         lambda x: -x,                           SAME),
    ("rsub-scalar",    [(3, 4)],         lambda x: 2 - x,                        SAME),
    ("rdiv-scalar",    [(3, 4)],         lambda x: 2 / x,                        SAME),
    ("pow-3",          [(3, 4)],         lambda x: x**3,                         SAME),
    ("pow-0.5",        [(3, 4)],         lambda x: (x * x) ** 0.5,               np.abs),
    ("matmul-weight",  [(2, 3, 4), (4, 5)], lambda a, b: a @ b,                     SAME),
    ("matmul-bcast",   [(2, 1, 3, 4), (5, 4, 2)], lambda a, b: a @ b,                     SAME),
    ("sum-tuple",      [(2, 3, 4)],      lambda x: x.sum(axis=(0, 2)),           SAME),
    ("mean-keepdims",  [(2, 3, 4)],      lambda x: x.mean(axis=-1, keepdims=True), SAME),
    ("max-axis",       [(2, 3, 4)],      lambda x: x.max(axis=1),                SAME),
    ("max-all",        [(2, 3, 4)],      lambda x: x.max(),                      SAME),
    ("reshape",        [(2, 3, 4)],      lambda x: x.reshape(4, -1),             SAME),
    ("transpose-perm", [(2, 3, 4)],      lambda x: x.transpose(2, 0, 1),         SAME),
    ("transpose-swap", [(2, 3, 4)],      lambda x: x.transpose(0, 2),            lambda x: np.swapaxes(x, 0, 2)),
    ("transpose-last", [(2, 3, 4, 5)],   lambda x: x.transpose(-2, -1),          lambda x: np.swapaxes(x, -2, -1)),
    ("T",              [(3, 4)],         lambda x: x.T,                          SAME),
    ("permute",        [(2, 3, 4)],      lambda x: x.permute(1, 0, 2),           lambda x: x.transpose(1, 0, 2)),
    ("getitem-basic",  [(3, 4)],         lambda x: x[1:, ::2],                   SAME),
    ("getitem-repeat", [(4, 5)],         lambda x: x[dev(IDX)],                  lambda x: x[IDX]),
    ("exp",            [(3, 4)],         lambda x: x.exp(),                      np.exp),
    ("log",            [(3, 4)],         lambda x: (x * x).log(),                lambda x: np.log(x * x)),
    ("tanh",           [(3, 4)],         lambda x: x.tanh(),                     np.tanh),
    ("relu",           [(3, 4)],         lambda x: x.relu(),                     lambda x: np.maximum(x, 0)),
    ("where",          [(3, 4), (1, 4)], lambda a, b: where(MASK, a, b),         lambda a, b: np.where(MASK, a, b)),
    ("masked_fill",    [(3, 4)],         lambda x: x.masked_fill(MASK, -np.inf), lambda x: np.where(MASK, -np.inf, x)),
    ("concat",         [(2, 3), (2, 1)], lambda a, b: concat([a, b], axis=-1),   lambda a, b: np.hstack([a, b])),
    ("stack",          [(2, 3), (2, 3)], lambda a, b: stack([a, b], axis=1),     lambda a, b: np.stack([a, b], 1)),
]  # fmt: skip


@pytest.mark.parametrize("shapes, fn, np_fn", [pytest.param(*row[1:], id=row[0]) for row in FORWARD])
def test_forward_matches_numpy(backend, rand, shapes, fn, np_fn):
    inputs = [rand(*s, domain="away0") for s in shapes]
    out = fn(*inputs)
    expected = (np_fn or fn)(*[host(t) for t in inputs])
    assert out.shape == expected.shape
    np.testing.assert_allclose(host(out), expected, rtol=1e-12)


@pytest.mark.parametrize("sections, lengths", [(3, [2, 2, 2]), ([1, 4], [1, 3, 2])], ids=["equal", "index-list"])
def test_split_matches_numpy(backend, rand, sections, lengths):
    x = rand(2, 6)
    parts = split(x, sections, axis=-1)
    assert [p.shape[-1] for p in parts] == lengths
    for p, e in zip(parts, np.split(host(x), sections, axis=-1)):
        np.testing.assert_array_equal(host(p), e)


# -- properties over random shapes (hypothesis) ----------------------------------------------------------------

BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


@PROPERTY
@given(data=st.data(), op=st.sampled_from(sorted(BINARY)))
def test_binary_ops_broadcast_like_numpy(data, op):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4))
    sa, sb = shapes.input_shapes
    a = data.draw(hnp.arrays(np.float64, sa, elements=FLOATS))
    b_elements = st.floats(0.5, 10) | st.floats(-10, -0.5) if op == "div" else FLOATS
    b = data.draw(hnp.arrays(np.float64, sb, elements=b_elements))
    g = data.draw(hnp.arrays(np.float64, shapes.result_shape, elements=FLOATS))  # the upstream gradient
    x, y = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)

    out = BINARY[op](x, y)
    assert out.shape == shapes.result_shape
    np.testing.assert_allclose(out.numpy(), BINARY[op](a, b), rtol=1e-12)

    out.backward(g)
    assert np.shape(x.grad) == sa and np.shape(y.grad) == sb  # reduced back to the input shapes
    ga, gb = {  # d(out)/da and d(out)/db elementwise, before reducing over the broadcast axes
        "add": lambda: (g, g),
        "sub": lambda: (g, -g),
        "mul": lambda: (g * b, g * a),
        "div": lambda: (g / b, -g * a / (b * b)),
    }[op]()
    np.testing.assert_allclose(x.grad, sum_to_shape(ga * np.ones_like(g), sa), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y.grad, sum_to_shape(gb * np.ones_like(g), sb), rtol=1e-10, atol=1e-10)
    if op == "add":  # the gradient is conserved: unbroadcast only sums
        assert np.sum(x.grad) == pytest.approx(np.sum(g)) and np.sum(y.grad) == pytest.approx(np.sum(g))
        np.testing.assert_allclose(unbroadcast(g, sa), sum_to_shape(g, sa), rtol=1e-10, atol=1e-10)


def axes_for(ndim: int, allow_tuple: bool):
    one = st.integers(-ndim, ndim - 1)
    many = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)
    return st.none() | one | many if allow_tuple else st.none() | one


@PROPERTY
@given(data=st.data(), op=st.sampled_from(["sum", "mean"]), keepdims=st.booleans())
def test_sum_and_mean_over_random_axes(data, op, keepdims):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    a = data.draw(hnp.arrays(np.float64, shape, elements=FLOATS))
    axis = data.draw(axes_for(len(shape), allow_tuple=True))
    expected = getattr(np, op)(a, axis=axis, keepdims=keepdims)
    x = Tensor(a, requires_grad=True)

    out = getattr(x, op)(axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)

    g = data.draw(hnp.arrays(np.float64, np.shape(expected), elements=FLOATS))
    out.backward(g)
    kept = np.sum(a, axis=axis, keepdims=True).shape  # g with the reduced axes kept as size 1
    n = a.size // int(np.prod(kept))  # how many elements each output summed
    spread = np.broadcast_to(np.reshape(g, kept), shape) / (n if op == "mean" else 1)
    np.testing.assert_allclose(x.grad, spread, rtol=1e-12)


@PROPERTY
@given(data=st.data(), keepdims=st.booleans())
def test_max_over_random_axes_routes_the_gradient_to_the_argmax(data, keepdims):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    a = data.draw(hnp.arrays(np.float64, shape, elements=st.integers(-1000, 1000).map(float), unique=True))
    axis = data.draw(axes_for(len(shape), allow_tuple=False))
    x = Tensor(a, requires_grad=True)

    out = x.max(axis=axis, keepdims=keepdims)
    np.testing.assert_array_equal(out.numpy(), np.max(a, axis=axis, keepdims=keepdims))

    g = data.draw(hnp.arrays(np.float64, out.shape, elements=FLOATS))
    out.backward(g)
    kept = np.max(a, axis=axis, keepdims=True)
    np.testing.assert_allclose(x.grad, (a == kept) * np.reshape(g, kept.shape), rtol=1e-12)  # unique: no ties


@PROPERTY
@given(data=st.data(), nkm=st.tuples(*[st.integers(1, 4)] * 3))
def test_matmul_over_random_batch_shapes(data, nkm):
    n, k, m = nkm
    batch = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    a = data.draw(hnp.arrays(np.float64, batch.input_shapes[0] + (n, k), elements=FLOATS))
    b = data.draw(hnp.arrays(np.float64, batch.input_shapes[1] + (k, m), elements=FLOATS))
    A, B = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)

    out = A @ B
    np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-10, atol=1e-10)

    g = data.draw(hnp.arrays(np.float64, out.shape, elements=FLOATS))
    out.backward(g)  # C = A B:  dA = G Bᵀ,  dB = Aᵀ G, each summed over the batch dims it was broadcast along
    np.testing.assert_allclose(A.grad, sum_to_shape(g @ np.swapaxes(b, -1, -2), a.shape), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(B.grad, sum_to_shape(np.swapaxes(a, -1, -2) @ g, b.shape), rtol=1e-10, atol=1e-9)


# -- gradient values of a few ops, by hand ---------------------------------------------------------------------


def test_repeated_integer_index_gets_every_gradient(backend):
    x = tensor(backend, [1.0, 2.0, 3.0])
    x[backend.to_device(np.array([0, 0, 2, 0]))].sum().backward()
    np.testing.assert_array_equal(host(x.grad), [3.0, 0.0, 1.0])


def test_max_ties_share_the_gradient(backend):
    x = tensor(backend, [1.0, 3.0, 3.0])
    x.max().backward()
    np.testing.assert_array_equal(host(x.grad), [0.0, 0.5, 0.5])


def test_relu_gradient_is_the_step_function(backend):
    x = tensor(backend, [-2.0, -0.5, 0.0, 0.5, 2.0])
    x.relu().sum().backward()
    np.testing.assert_array_equal(host(x.grad), [0.0, 0.0, 0.0, 1.0, 1.0])  # 0 at the kink, as in PyTorch


# -- graph semantics -------------------------------------------------------------------------------------------


def test_a_node_used_twice_gets_both_contributions(backend, rand):
    x = rand(3)
    (x * x).sum().backward()  # d(x²)/dx = 2x
    np.testing.assert_allclose(host(x.grad), 2 * host(x), rtol=1e-12)

    a = rand(3)
    (a + a).sum().backward()
    np.testing.assert_array_equal(host(a.grad), [2.0, 2.0, 2.0])


def test_diamond_graph(backend, rand):
    a = rand(4)
    b, c = a * 2.0, a * 3.0  # two paths from a ...
    (b * c).sum().backward()  # ... that meet again: d(6a²)/da = 12a
    np.testing.assert_allclose(host(a.grad), 12 * host(a), rtol=1e-12)


def test_gradients_accumulate_until_reset(backend, rand):
    x = rand(2, 3)
    y = (x * x).sum()
    y.backward(retain_graph=True)  # keep the graph for the next pass
    y.backward(retain_graph=True)  # += : twice the gradient
    np.testing.assert_allclose(host(x.grad), 4 * host(x), rtol=1e-12)

    x.zero_grad()
    assert x.grad is None
    y.backward()
    np.testing.assert_allclose(host(x.grad), 2 * host(x), rtol=1e-12)

    x.grad = None  # the same reset, by hand
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(host(x.grad), np.full((2, 3), 3.0))


def test_sum_gradients_accumulate_into_a_writable_array(backend, rand):
    x = rand(2, 3)
    y = x.sum()  # its backward hands out a read-only broadcast view of the gradient
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(host(x.grad), np.full((2, 3), 2.0))


def test_leaf_gradients_are_their_own_arrays(backend, rand):
    a, b = rand(2, 3), rand(2, 3)
    g = backend.xp.ones((2, 3))
    (a + b).backward(g)  # add passes the same gradient array to both inputs
    (a * 2.0).sum().backward()  # accumulating into a.grad ...
    np.testing.assert_array_equal(host(a.grad), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(host(b.grad), np.ones((2, 3)))  # ... must not change b.grad
    np.testing.assert_array_equal(host(g), np.ones((2, 3)))  # ... nor the array passed to backward()


def test_retain_grad_keeps_an_intermediate_gradient(backend, rand):
    x = rand(3)
    h, k = x * 2.0, x * 5.0
    h.retain_grad()
    (h * h + k).sum().backward()
    np.testing.assert_allclose(host(h.grad), 2 * host(h), rtol=1e-12)  # kept, because asked
    assert k.grad is None  # not asked: intermediates do not keep their gradient
    np.testing.assert_allclose(host(x.grad), 8 * host(x) + 5, rtol=1e-12)  # and the leaf is unaffected


def test_deep_chain_backprops_without_recursion_error(backend):
    x = tensor(backend, 1.0)
    y = x
    for _ in range(10_000):  # 20,000 ops deep: far past Python's recursion limit of 1,000
        y = y * 1.0001 + 0
    y.backward()
    assert y.item() == pytest.approx(1.0001**10_000, rel=1e-9)
    assert float(host(x.grad)) == pytest.approx(1.0001**10_000, rel=1e-9)


def test_detach_cuts_the_graph(backend, rand):
    x = rand(3)
    d = x.detach()
    assert not d.requires_grad and d._parents == ()
    np.testing.assert_array_equal(host(d), host(x))
    (x * d).sum().backward()  # d is a constant: d(x·c)/dx = c
    np.testing.assert_allclose(host(x.grad), host(x), rtol=1e-12)


# -- frozen inputs: no gradient, and no compute spent on one ---------------------------------------------------


@pytest.mark.parametrize("x_shape", [(4, 3), (2, 4, 3)], ids=["2d", "batched"])
@pytest.mark.parametrize(
    "x_trainable, w_trainable, n_matmuls",
    [(True, False, 1), (True, True, 2), (False, True, 1)],
    ids=["W-frozen", "both-trainable", "x-frozen"],
)
def test_backward_spends_matmuls_only_on_inputs_that_need_a_gradient(
    backend, rand, x_shape, x_trainable, w_trainable, n_matmuls
):
    x, W = rand(*x_shape, requires_grad=x_trainable), rand(3, 5, requires_grad=w_trainable)
    g = rand(*x_shape[:-1], 5, requires_grad=False)
    y = x @ W
    with engine.count_matmuls() as matmuls:  # count the backward only
        y.backward(g.data)
    # dx = g Wᵀ only if x needs it, dW = xᵀ g only if W does (LoRA's saving)
    assert matmuls.calls == len(matmuls.products) == n_matmuls
    assert (x.grad is not None) == x_trainable and (W.grad is not None) == w_trainable
    if x_trainable:
        np.testing.assert_allclose(host(x.grad), host(g) @ host(W).T, rtol=1e-12)
    if w_trainable:
        xs, gs = host(x).reshape(-1, 3), host(g).reshape(-1, 5)
        np.testing.assert_allclose(host(W.grad), xs.T @ gs, rtol=1e-12)


def test_backward_frees_the_graph_unless_asked_to_keep_it(backend, rand):
    x = rand(2, 3)
    h = x * 2.0
    y = (h * h).sum()
    y.backward()
    assert h._parents == () and y._parents == ()  # the links (and the arrays they held) are gone
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()
    np.testing.assert_allclose(host(x.grad), 8 * host(x), rtol=1e-12)  # the first pass counted once


def test_count_matmuls_counts_calls_flops_and_shapes(backend, rand):
    a, b = rand(2, 3, 4), rand(4, 5)
    with engine.count_matmuls() as outer:
        with engine.count_matmuls() as inner:
            engine.matmul(a.data, b.data)
        a @ b
    assert (inner.calls, inner.flops) == (1, 2 * 2 * 3 * 5 * 4)  # 2·k FLOPs per output element
    assert (outer.calls, outer.flops) == (2, 2 * inner.flops)  # nested blocks both count
    assert outer.products[0][:4] == ((2, 3, 4), (4, 5), (2, 3, 5), inner.flops) and outer.products[0][4] >= 0
    a @ b
    assert outer.calls == 2 and not engine._counters  # nothing counts outside a block


def test_frozen_matmul_records_no_graph(backend, rand):
    x, W = rand(4, 3, requires_grad=False), rand(3, 5, requires_grad=False)
    y = x @ W
    assert not y.requires_grad and y._parents == () and y._backward is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_frozen_leaf_receives_no_grad(backend, rand):
    x, c = rand(3), rand(3, requires_grad=False)
    (x * c + c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(host(x.grad), host(c), rtol=1e-12)


# -- no_grad ---------------------------------------------------------------------------------------------------


def test_no_grad_records_no_graph(backend, rand):
    x = rand(3, 4)
    with no_grad():
        y = (x @ x.T).exp().sum(axis=0) * 2.0
    assert not y.requires_grad and y._parents == () and y._backward is None
    assert (x * 2.0).requires_grad  # recording resumes after the block


def test_no_grad_nests_and_restores():
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()  # the inner block restores the outer block's state, not "enabled"
    assert is_grad_enabled()


def test_no_grad_restores_after_an_exception():
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("boom")
    assert is_grad_enabled()


def test_no_grad_is_exported():
    assert lora_np.no_grad is no_grad


# -- dtypes and plumbing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, dtype",
    [
        (1.5, np.float32),
        ([1.0, 2.0], np.float32),
        ([[1.0], [2.5]], np.float32),
        (np.zeros(3), np.float64),
        (np.zeros(3, dtype=np.float32), np.float32),
        (np.array([1, 2]), np.int64),
        (np.array([1, 2], dtype=np.int32), np.int32),
    ],
    ids=["py-float", "py-list", "py-nested-list", "f64-array", "f32-array", "int64-array", "int32-array"],
)
def test_dtype_of_new_tensors(data, dtype):
    assert Tensor(data).dtype == dtype


def test_explicit_dtype_wins():
    assert Tensor([1, 2], dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize(
    "fn",
    [lambda x: 2.0 * x, lambda x: x * 2, lambda x: x + 1, lambda x: 1 - x, lambda x: x / 3.0, lambda x: 3.0 / x,
     lambda x: x**2, lambda x: x * np.float64(2.0), lambda x: x.mean()],
    ids=["2.0*x", "x*2", "x+1", "1-x", "x/3.0", "3.0/x", "x**2", "x*np.float64", "mean"],
)
def test_python_scalars_keep_float32(fn):
    x = Tensor([1.0, 2.0], requires_grad=True)
    out = fn(x)
    assert out.dtype == np.float32
    out.sum().backward()
    assert x.grad.dtype == np.float32


def test_item_numpy_and_len(backend):
    x = tensor(backend, [[3.5]])
    assert x.item() == 3.5 and isinstance(x.item(), float)
    y = tensor(backend, [[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(y.numpy(), np.ndarray)
    np.testing.assert_array_equal(y.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    assert len(y) == 2 and y.shape == (2, 2) and y.ndim == 2 and y.size == 4


def test_repr_names_shape_dtype_and_op():
    r = repr(Tensor(np.zeros((2, 3)), requires_grad=True) * 2.0)
    assert "shape=(2, 3)" in r and "float64" in r and "requires_grad=True" in r and "op=mul" in r


# -- bad input: each error names the problem -------------------------------------------------------------------


def zeros(*shape):
    return Tensor(np.zeros(shape), requires_grad=True)


ERRORS = [
    # name             call                                          error       message (a literal part of it)
    ("add-shapes",     lambda: zeros(2, 3) + zeros(4),               ValueError, "add: shapes (2, 3) and (4,)"),
    ("mul-shapes",     lambda: zeros(2, 3) * zeros(3, 2),            ValueError, "mul: shapes (2, 3) and (3, 2)"),
    ("div-shapes",     lambda: zeros(2, 3) / zeros(2, 2),            ValueError, "div: shapes (2, 3) and (2, 2)"),
    ("where-shapes",   lambda: where(True, zeros(2, 3), zeros(3, 2)), ValueError, "where: shapes (2, 3) and (3, 2)"),
    ("matmul-inner",   lambda: zeros(2, 3) @ zeros(4, 5),            ValueError, "matmul: shapes (2, 3) @ (4, 5)"),
    ("matmul-1d",      lambda: zeros(3) @ zeros(3, 2),               ValueError, "matmul: shapes (3,) @ (3, 2)"),
    ("matmul-batch",   lambda: zeros(2, 3, 4) @ zeros(5, 4, 2),      ValueError, "batch dims of (2, 3, 4) @ (5, 4, 2)"),
    ("reshape",        lambda: zeros(2, 3).reshape(4, 2),            ValueError, "(2, 3) (6 elements) into (4, 2)"),
    ("pow-tensor",     lambda: zeros(2) ** zeros(2),                 TypeError,  "only a scalar exponent"),
    ("pow-array",      lambda: zeros(2) ** np.ones(2),               TypeError,  "only a scalar exponent"),
    ("transpose-perm", lambda: zeros(2, 3, 4).transpose(0, 0, 1),    ValueError, "(0, 0, 1) are not a permutation"),
    ("split-unequal",  lambda: split(zeros(2, 5), 2),                ValueError, "length 5 does not divide into 2"),
    ("stack-shapes",   lambda: stack([zeros(2, 3), zeros(3, 2)]),    ValueError, "got [(2, 3), (3, 2)]"),
    ("concat-shapes",  lambda: concat([zeros(2, 3), zeros(2, 4)]),   ValueError, "[(2, 3), (2, 4)] do not match"),
    ("item-many",      lambda: zeros(2).item(),                      ValueError, "one element, got shape (2,)"),
    ("int-grad",       lambda: Tensor(np.arange(3), requires_grad=True), TypeError, "only floating-point tensors can"),
    ("int64-grad",     lambda: Tensor(np.arange(3), requires_grad=True), TypeError, "got dtype int64"),
    ("bool-grad",      lambda: Tensor(np.ones(2, bool), requires_grad=True), TypeError, "got dtype bool"),
    ("int-grad-later", lambda: setattr(Tensor(np.arange(3)), "requires_grad", True), TypeError, "floating-point"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", [pytest.param(*row[1:], id=row[0]) for row in ERRORS])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_backward_of_a_non_scalar_needs_a_gradient():
    y = zeros(2, 3) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\) needs a gradient argument"):
        y.backward()


def test_backward_with_a_wrongly_shaped_gradient():
    y = zeros(2, 3) * 2.0
    with pytest.raises(ValueError, match=re.escape("gradient of shape (3, 2) for a tensor of shape (2, 3)")):
        y.backward(np.ones((3, 2)))


def test_backward_on_a_tensor_that_does_not_require_grad():
    y = Tensor(np.ones(3)) * 2.0
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
