"""A minimal reverse-mode autograd engine on arrays: ``Tensor`` and its ops.

Read it like micrograd, with arrays instead of scalars. Every op is one function that computes the forward
value and defines, a few lines below, the ``backward`` closure that maps the gradient of the output to the
gradients of the inputs. Two rules make it the engine LoRA needs:

* A closure computes the gradient of an input only if that input ``requires_grad``. A frozen weight W gets no
  gradient and no matmul is spent on it: this is the compute (and memory) that LoRA saves.
* Gradients accumulate. ``backward()`` adds into ``.grad`` of the leaves (``+=``), so call ``zero_grad()`` (or set
  ``.grad = None``) between steps. Intermediate tensors do not keep their gradient (memory); call
  ``retain_grad()`` on one to look at it.

Shapes follow NumPy broadcasting; every binary op reduces its gradients back to the input's shape through the
one helper ``unbroadcast``.

``backward()`` frees the graph as it goes (each node drops its closure and its inputs once it has passed its
gradient on), so activations die as early as possible; ``backward(retain_graph=True)`` keeps it for a second pass.

How to write a new op (the ops below, ``functional.py``, ``lora.lora_linear`` and ``fused.py`` all follow it)::

    def cube(x: Tensor) -> Tensor:
        out = x.data ** 3                                   # the forward value, a plain array
        def backward(g):                                    # g = dL/d(out), same shape as out
            return (g * 3 * x.data**2 if x.requires_grad else None,)    # one gradient (or None) per parent
        return Tensor.from_op(out, (x,), "cube", backward)  # joins the graph only if some parent needs a gradient

Every matrix product goes through ``engine.matmul(a, b)`` (on arrays), so that ``count_matmuls()`` sees it: the
tests, ``benchmarks/bench_step.py`` and the notebooks count the products (and their FLOPs) of a step that way.
Add a gradcheck row for the new op in ``tests/test_gradcheck.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import backend

# Bumped whenever a change to the engine (or the ops and layers built on it) changes the numbers a training run
# produces: cached base models of an older version are then retrained, never reused (part of the cache key).
NUMERICS_VERSION = 1

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block, ops record no graph (evaluation, generation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` down to ``shape``: the adjoint of NumPy broadcasting, shared by every binary op."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)  # leading axes that broadcasting added
    grad = grad.sum(axis=tuple(range(extra))) if extra > 0 else grad
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)  # axes of size 1 that grew
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


@dataclass(eq=False)  # compared by identity: two counters that saw the same products are still two counters
class MatmulCount:
    """What ``count_matmuls`` saw: the number of products, their FLOPs (2·k per output element) and, per product,
    (shape of a, shape of b, shape of the result, FLOPs, seconds)."""

    calls: int = 0
    flops: int = 0
    products: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int, float]] = field(default_factory=list)


_counters: list[tuple[MatmulCount, Callable[[], None] | None]] = []  # the active count_matmuls blocks


@contextlib.contextmanager
def count_matmuls(sync: Callable[[], None] | None = None) -> Iterator[MatmulCount]:
    """Count every ``matmul`` inside the block (nested blocks each count). ``sync`` (e.g. a GPU stream sync) is
    called after each product so that its seconds are the product's own; without it they are host time."""
    counter = MatmulCount()
    _counters.append((counter, sync))
    try:
        yield counter
    finally:
        _counters.remove((counter, sync))


def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` on arrays. Every matrix product of lora_np goes through here, so that ``count_matmuls`` sees it."""
    if not _counters:
        return a @ b
    t0 = time.perf_counter()
    out = a @ b
    for _, sync in _counters:
        if sync is not None:
            sync()
    seconds, flops = time.perf_counter() - t0, 2 * out.size * a.shape[-1]  # each output: a k-long dot product
    for counter, _ in _counters:
        counter.calls += 1
        counter.flops += flops
        counter.products.append((a.shape, b.shape, out.shape, flops, seconds))
    return out


def _as_array(data: Any, dtype: Any = None) -> Any:
    xp = backend.xp
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return xp.asarray(data, dtype=dtype)
    if backend.array_module(data) is not xp and hasattr(data, "shape") and not isinstance(data, backend.np.generic):
        raise TypeError(
            f"array of backend {backend.array_module(data).__name__!r} given while the active backend is "
            f"{backend.get_backend()!r}: move it with backend.to_device() or backend.to_numpy() first"
        )
    arr = xp.asarray(data)
    if arr.dtype.kind in "biu" or arr.dtype.kind == "f" and hasattr(data, "dtype"):
        return arr  # integer ids and explicitly typed float arrays keep their dtype (float64 for gradcheck)
    return arr.astype(backend.DEFAULT_DTYPE)  # Python numbers and lists become float32


class Tensor:
    """An array with a gradient. ``data`` is a numpy (or cupy) array; ``grad`` has its shape, or is None."""

    __array_ufunc__ = None  # numpy defers to us, so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None, name: str = "") -> None:
        self.data = _as_array(data, dtype)
        self.grad: Any = None
        self.requires_grad = requires_grad  # checked by the setter below
        self.name = name  # a label for pictures of the graph (notebook 01); the engine does not use it
        self._parents: tuple[Tensor, ...] = ()
        self._backward: Callable[[Any], Sequence[Any]] | None = None
        self._op = ""
        self._retain = False

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        # Only floating-point tensors can require gradients (as in PyTorch): a gradient is a small change, and an
        # integer tensor (token ids) cannot change by a small amount. Its gradient would silently stay zero.
        if value and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.data.dtype}")
        self._requires_grad = bool(value)

    # -- plumbing ----------------------------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag}{', op=' + self._op if self._op else ''})"

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self) -> Any:
        """The values as a host NumPy array."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor of one element, got shape {self.shape}")
        return float(self.data.reshape(-1)[0])

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def retain_grad(self) -> Tensor:
        """Keep this intermediate tensor's gradient in ``.grad`` after backward (for inspection)."""
        self._retain = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    @staticmethod
    def from_op(data: Any, parents: tuple[Tensor, ...], op_name: str,
                backward: Callable[[Any], Sequence[Any]]) -> Tensor:
        """The output of an op: ``data`` computed from ``parents``, and ``backward(g)`` that returns one gradient
        (or None) per parent. It joins the graph only if some parent needs a gradient (and grad is enabled)."""
        out = Tensor(data)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad, out._parents, out._op, out._backward = True, parents, op_name, backward
        return out

    # -- backward ----------------------------------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Backpropagate from this tensor: accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that
        requires a gradient. A non-scalar tensor needs ``grad`` (the gradient of some scalar w.r.t. it).

        The graph is freed on the way (every node lets go of its inputs and closure once used), so the arrays
        the forward pass kept die as soon as backward is past them; ``retain_graph=True`` keeps it."""
        pending = {id(self): self._output_gradient(grad)}  # dL/d(node) summed so far, for nodes not yet visited
        _backpropagate(_topological_order(self), pending, retain_graph)

    def _output_gradient(self, grad: Any) -> Any:
        """dL/d(self) to start backward from: ``grad`` checked against this tensor, or 1 for a scalar."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input requires_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs a gradient argument "
                    "of the same shape (or reduce it to a scalar first, e.g. .sum())"
                )
            grad = backend.xp.ones_like(self.data)
        grad = _as_array(grad, self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        return grad

    # -- elementwise arithmetic --------------------------------------------------------------------------------
    def _lift(self, other: Any) -> Tensor:
        """Wrap a constant as a Tensor. Python numbers and lists take this tensor's float dtype (so 2.0 * x stays
        float32); arrays keep their own dtype (NumPy's promotion rules then apply)."""
        if isinstance(other, Tensor):
            return other
        if hasattr(other, "dtype") and getattr(other, "ndim", 0) > 0:
            return Tensor(other)
        return Tensor(other, dtype=self.dtype if self.dtype.kind == "f" else None)

    def _check_broadcast(self, other: Tensor, op: str) -> None:
        try:
            backend.np.broadcast_shapes(self.shape, other.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {self.shape} and {other.shape} do not broadcast") from None
        if backend.array_module(self.data) is not backend.array_module(other.data):
            raise TypeError(f"{op}: operands live on different backends (numpy and cupy); move one first")

    def __add__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        a._check_broadcast(b, "add")

        def backward(g):  # d(a+b)/da = d(a+b)/db = 1
            return unbroadcast(g, a.shape), unbroadcast(g, b.shape)

        return Tensor.from_op(a.data + b.data, (a, b), "add", backward)

    def __mul__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        a._check_broadcast(b, "mul")

        def backward(g):  # d(ab)/da = b, d(ab)/db = a
            ga = unbroadcast(g * b.data, a.shape) if a.requires_grad else None
            gb = unbroadcast(g * a.data, b.shape) if b.requires_grad else None
            return ga, gb

        return Tensor.from_op(a.data * b.data, (a, b), "mul", backward)

    def __truediv__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        a._check_broadcast(b, "div")

        def backward(g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
            ga = unbroadcast(g / b.data, a.shape) if a.requires_grad else None
            gb = unbroadcast(-g * a.data / (b.data * b.data), b.shape) if b.requires_grad else None
            return ga, gb

        return Tensor.from_op(a.data / b.data, (a, b), "div", backward)

    def __pow__(self, p: float) -> Tensor:
        if isinstance(p, Tensor) or not backend.np.isscalar(p):
            raise TypeError(f"pow: only a scalar exponent is supported, got {type(p).__name__}")
        a = self

        def backward(g):  # d(a^p)/da = p a^(p-1)
            return (g * p * a.data ** (p - 1),)

        return Tensor.from_op(a.data**p, (a,), f"pow{p}", backward)

    def __neg__(self) -> Tensor:
        return Tensor.from_op(-self.data, (self,), "neg", lambda g: (-g,))

    def __sub__(self, other: Any) -> Tensor:
        a, b = self, self._lift(other)
        a._check_broadcast(b, "sub")

        def backward(g):  # d(a-b)/da = 1, d(a-b)/db = -1
            return unbroadcast(g, a.shape), (-unbroadcast(g, b.shape) if b.requires_grad else None)

        return Tensor.from_op(a.data - b.data, (a, b), "sub", backward)

    def __radd__(self, other: Any) -> Tensor:
        return self + other

    def __rsub__(self, other: Any) -> Tensor:
        return self._lift(other) - self

    def __rmul__(self, other: Any) -> Tensor:
        return self * other

    def __rtruediv__(self, other: Any) -> Tensor:
        return self._lift(other) / self

    # -- matrix product ----------------------------------------------------------------------------------------
    def __matmul__(self, other: Tensor) -> Tensor:
        a, b = self, self._lift(other)
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} @ {b.shape} do not match (need (..., n, k) @ (..., k, m))")
        try:
            backend.np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dims of {a.shape} @ {b.shape} do not broadcast") from None
        if backend.array_module(a.data) is not backend.array_module(b.data):
            raise TypeError("matmul: operands live on different backends (numpy and cupy); move one first")

        def backward(g):  # C = A @ B:  dA = dC @ Bᵀ,  dB = Aᵀ @ dC
            ga = unbroadcast(matmul(g, b.data.swapaxes(-1, -2)), a.shape) if a.requires_grad else None
            gb = None
            if b.requires_grad:
                if b.ndim == 2:  # a weight shared by all rows: fold the batch into one big (k, N) @ (N, m) product
                    gb = matmul(a.data.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))
                else:
                    gb = unbroadcast(matmul(a.data.swapaxes(-1, -2), g), b.shape)
            return ga, gb

        return Tensor.from_op(matmul(a.data, b.data), (a, b), "matmul", backward)

    # -- reductions --------------------------------------------------------------------------------------------
    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        a = self

        def backward(g):  # every input element contributes once: spread g back over the summed axes
            if not keepdims and axis is not None:
                g = backend.xp.expand_dims(g, axis)
            return (backend.xp.broadcast_to(g, a.shape),)

        return Tensor.from_op(a.data.sum(axis=axis, keepdims=keepdims), (a,), "sum", backward)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        axes = range(self.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
        n = int(backend.np.prod([self.shape[i] for i in axes]))  # how many elements each mean averages
        return self.sum(axis, keepdims) * (1.0 / n)

    def max(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        a = self
        out = a.data.max(axis=axis, keepdims=True)

        def backward(g):  # the gradient flows to the maximum; ties share it equally
            g = g if keepdims or axis is None else backend.xp.expand_dims(g, axis)
            mask = a.data == out
            return (mask * (g / mask.sum(axis=axis, keepdims=True)),)

        return Tensor.from_op(out if keepdims else out.reshape(a.data.max(axis=axis).shape), (a,), "max", backward)

    # -- shape ops ---------------------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> Tensor:
        a = self
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        try:
            out = a.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {a.shape} ({a.size} elements) into {tuple(shape)}") from None
        return Tensor.from_op(out, (a,), "reshape", lambda g: (g.reshape(a.shape),))

    def transpose(self, *axes: int) -> Tensor:
        """Permute axes: with all of them, like numpy; with two ints, swap just those two (like torch, also for a
        2-D tensor: ``transpose(0, 1)`` swaps); with none, reverse them (``.T``)."""
        a = self
        if len(axes) == 2:
            perm = list(range(a.ndim))
            perm[axes[0]], perm[axes[1]] = perm[axes[1]], perm[axes[0]]
            axes = tuple(perm)
        axes = axes or tuple(reversed(range(a.ndim)))
        if sorted(x % a.ndim for x in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation for shape {a.shape}")
        inverse = tuple(backend.np.argsort([x % a.ndim for x in axes]))
        return Tensor.from_op(a.data.transpose(axes), (a,), "transpose", lambda g: (g.transpose(inverse),))

    permute = transpose
    T = property(lambda self: self.transpose())

    def __getitem__(self, index: Any) -> Tensor:
        a = self
        index = index.data if isinstance(index, Tensor) else index

        def backward(g):
            ga = backend.xp.zeros_like(a.data)
            if _is_basic_index(index):  # slices and ints pick each element at most once: plain assignment
                ga[index] = g
            else:  # scatter-add: an element picked twice (repeated integer index) gets both gradients
                backend.scatter_add(ga, index, g)
            return (ga,)

        return Tensor.from_op(a.data[index], (a,), "getitem", backward)

    # -- elementwise functions ---------------------------------------------------------------------------------
    def exp(self) -> Tensor:
        out = backend.xp.exp(self.data)
        return Tensor.from_op(out, (self,), "exp", lambda g: (g * out,))  # d(eˣ)/dx = eˣ

    def log(self) -> Tensor:
        a = self
        return Tensor.from_op(backend.xp.log(a.data), (a,), "log", lambda g: (g / a.data,))  # d(ln x)/dx = 1/x

    def tanh(self) -> Tensor:
        out = backend.xp.tanh(self.data)
        return Tensor.from_op(out, (self,), "tanh", lambda g: (g * (1 - out * out),))  # 1 - tanh²

    def relu(self) -> Tensor:
        a = self
        return Tensor.from_op(backend.xp.maximum(a.data, 0), (a,), "relu", lambda g: (g * (a.data > 0),))

    def masked_fill(self, mask: Any, value: float) -> Tensor:
        """Elements where ``mask`` is True become ``value`` (e.g. -inf above the causal diagonal)."""
        return where(mask, self._lift(value), self)


# -- the backward pass, in three steps: an order, one node's local gradients, their sum per input -----------------


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every graph node that ``root`` depends on, each after all of its inputs (root last): an iterative
    post-order depth-first search, since a recursive one overflows Python's stack on deep graphs."""
    order: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))  # comes off the stack again once its inputs are in the order
            stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in seen)
    return order


def _backpropagate(order: list[Tensor], pending: dict[int, Any], retain_graph: bool) -> None:
    """Walk ``order`` from the root back, each node once all its consumers have given it their gradient:
    ``pending`` holds the sum so far per node, ``_local_gradients`` turns it into one gradient per input."""
    owned: set[int] = set()  # see _accumulate
    while order:  # popping (not iterating) lets each node go as soon as it is done: memory is freed early
        node = order.pop()
        if id(node) in pending:
            for parent, g in _local_gradients(node, pending.pop(id(node)), retain_graph):
                _accumulate(pending, owned, parent, g)


def _local_gradients(node: Tensor, g: Any, retain_graph: bool) -> list[tuple[Tensor, Any]]:
    """(input, gradient) for every input of ``node`` that needs one, given g = dL/d(node). A leaf (or a node asked
    to ``retain_grad``) adds g into its ``.grad``. The node then lets go of its closure and inputs, unless
    ``retain_graph``; g itself is not kept past this call."""
    if node._backward is None or node._retain:
        if node.grad is None:
            node.grad = backend.xp.array(g, dtype=node.dtype)  # a copy: g may be a read-only view
        else:
            node.grad += g
    if node._backward is None:
        return []
    parents, grads = node._parents, node._backward(g)
    if not retain_graph:  # drop the closure (and the arrays it captured) and the links to the inputs
        node._parents, node._backward = (), _freed_graph
    return [(p, pg) for p, pg in zip(parents, grads) if pg is not None and p.requires_grad]


def _accumulate(pending: dict[int, Any], owned: set[int], node: Tensor, g: Any) -> None:
    """pending[node] += g. Ownership rule: a gradient an op returns may be shared (``a + b`` hands the same g to
    both inputs), so the first one is stored as it came and never written into; the first sum is a fresh array,
    ``owned`` from then on, and later ones are added into it in place (no new array per consumer)."""
    key = id(node)
    if key not in pending:
        pending[key] = g
    elif key in owned:
        pending[key] += g
    else:
        pending[key] = pending[key] + g
        owned.add(key)


def _freed_graph(g: Any) -> Sequence[Any]:
    raise RuntimeError("backward() through a graph a second time: the first backward() freed it; call it with "
                       "retain_graph=True to keep the graph for another pass")


def _is_basic_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def where(cond: Any, x: Any, y: Any) -> Tensor:
    """Elementwise ``x if cond else y``; the gradient goes to whichever input was picked."""
    cond = cond.data if isinstance(cond, Tensor) else backend.xp.asarray(cond)
    x = x if isinstance(x, Tensor) else Tensor(x)
    y = y if isinstance(y, Tensor) else Tensor(y, dtype=x.dtype)
    x._check_broadcast(y, "where")
    out = backend.xp.where(cond, x.data, y.data)

    def backward(g):
        gx = unbroadcast(backend.xp.where(cond, g, 0), x.shape) if x.requires_grad else None
        gy = unbroadcast(backend.xp.where(cond, 0, g), y.shape) if y.requires_grad else None
        return gx, gy

    return Tensor.from_op(out, (x, y), "where", backward)


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join along an existing axis; the gradient is cut back into the pieces."""
    tensors = tuple(tensors)
    shapes = [t.shape for t in tensors]
    try:
        out = backend.xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        raise ValueError(f"concat: shapes {shapes} do not match outside axis {axis}") from None
    cuts = backend.np.cumsum([s[axis] for s in shapes])[:-1].tolist()
    return Tensor.from_op(out, tensors, "concat", lambda g: backend.xp.split(g, cuts, axis=axis))


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join along a new axis: ``concat`` of the inputs each given a new axis of size one."""
    tensors = tuple(tensors)
    if len({t.shape for t in tensors}) != 1:
        raise ValueError(f"stack: all shapes must be equal, got {[t.shape for t in tensors]}")
    new_shape = backend.np.expand_dims(backend.np.empty(tensors[0].shape, dtype=bool), axis).shape  # a new 1-axis
    return concat([t.reshape(new_shape) for t in tensors], axis=axis)


def split(t: Tensor, sections: int | Sequence[int], axis: int = -1) -> list[Tensor]:
    """Cut into ``sections`` equal parts (an int) or at the given indices, like ``numpy.split``; each part is a
    slice of ``t``, so the gradients of the parts scatter back into one gradient for ``t``."""
    n = t.shape[axis]
    if isinstance(sections, int):
        if n % sections:
            raise ValueError(f"split: axis {axis} of length {n} does not divide into {sections} equal parts")
        bounds = list(range(0, n + 1, n // sections))
    else:
        bounds = [0, *sections, n]
    prefix = (slice(None),) * (axis % t.ndim)
    return [t[prefix + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:])]
