"""Fused neural-network functions, each with a hand-derived backward next to its forward.

Composing these from engine ops would also work, but a fused op stores fewer intermediate arrays and its
backward is one line of calculus a reader can check. Shapes: ``B`` batch, ``T`` time, ``C`` channels,
``V`` vocabulary; ``...`` any leading dims.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend, engine, gpu
from .engine import Tensor

GELU_C = math.sqrt(2.0 / math.pi)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W + b in one op: (..., d_in) @ (d_in, d_out) + (d_out,) -> (..., d_out).

    Fused so that the graph keeps only x (W and b are parameters anyway), not also the product before the bias.
    A frozen W costs no gradient matmul: that branch of the backward is simply skipped.
    """
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"linear: input of shape {x.shape} for a weight of shape {weight.shape} (d_in mismatch)")
    out = engine.matmul(x.data, weight.data)  # through engine.matmul, which count_matmuls sees
    if bias is not None:
        out += bias.data  # in place: the product is a fresh array, so the bias needs no second (..., d_out) one
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):  # y = xW + b:  dx = g Wᵀ,  dW = xᵀ g (summed over all rows),  db = Σ g
        rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (..., k) -> (N, k), a view
        gx = engine.matmul(g, weight.data.T) if x.requires_grad else None  # Wᵀ is a view: BLAS reads it transposed
        gw = engine.matmul(rows(x.data).T, rows(g)) if weight.requires_grad else None
        gb = rows(g).sum(axis=0) if bias is not None and bias.requires_grad else None
        return (gx, gw, gb)[: len(parents)]

    return Tensor.from_op(out, parents, "linear", backward)


# The elementwise functions below work in place on arrays they just made (``out=``, ``*=``): a fresh (N, 4C)
# temporary costs a trip to the allocator and, above a few hundred KiB, new zero-filled pages from the OS; the
# in-place forms ran GELU's forward and backward 3-4x faster on the bench configuration (benchmarks/README.md).


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation as in GPT-2: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    out, t = _gelu_forward(x.data)  # t = tanh(u): the only array the backward keeps besides x
    return Tensor.from_op(out, (x,), "gelu", lambda g: (_gelu_backward(x.data, t, g),))


@gpu.fusable
def _gelu_forward(xd: Any) -> tuple[Any, Any]:
    """(GELU(x), t = tanh(u)) with u = √(2/π)(x + 0.044715x³): two new arrays, every other step in place."""
    t = xd * xd  # x*x, not x**2: numpy's float power is several times slower
    t *= 0.044715
    t += 1.0
    t *= xd
    t *= GELU_C  # u = √(2/π)(x + 0.044715x³)
    backend.xp.tanh(t, out=t)  # t = tanh(u)
    out = t + 1.0
    out *= xd
    out *= 0.5
    return out, t


@gpu.fusable
def _gelu_backward(xd: Any, t: Any, g: Any) -> Any:
    """Product rule: 0.5(1+t) + 0.5·x·(1-t²)·du/dx,  du/dx = √(2/π)(1 + 3·0.044715·x²), times g."""
    d = xd * xd
    d *= 3 * 0.044715
    d += 1.0
    d *= 0.5 * GELU_C
    d *= xd  # 0.5·x·du/dx
    t2 = t * t
    backend.xp.subtract(1.0, t2, out=t2)  # 1 - t²
    d *= t2
    d += 0.5
    backend.xp.multiply(t, 0.5, out=t2)
    d += t2  # 0.5(1 + t) + 0.5·x·(1-t²)·du/dx
    d *= g
    return d


# erfc(z) for z >= 0 as t·exp(-z² + P(t)), t = 1/(1 + z/2): Numerical Recipes in C (2nd ed., §6.2, ``erfcc``),
# a Chebyshev fit with fractional error below 1.2e-7 everywhere. NumPy has no erf, and this keeps the op to a
# dozen array operations on either backend (math.erf per element is ~40x slower than the tanh GELU).
_ERFC_P = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
           -0.82215223, 0.17087277)
SQRT_2PI = math.sqrt(2.0 * math.pi)


def _erfc_nonneg(z: Any) -> Any:
    """erfc(z) for an array z >= 0 (Numerical Recipes' erfcc): relative error < 1.2e-7, so tiny in the tails too."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = _ERFC_P[-1]
    for c in reversed(_ERFC_P[:-1]):  # Horner: c0 + t(c1 + t(c2 + ...))
        poly = c + t * poly
    return t * backend.xp.exp(poly - z * z)


def gelu_erf(x: Tensor) -> Tensor:
    """GELU as defined (Hendrycks & Gimpel 2016) and as BERT uses it ("gelu"): x·Φ(x), Φ the normal CDF.

    Φ(x) = 1 - erfc(x/√2)/2 for x >= 0 and erfc(-x/√2)/2 for x < 0, with erfc from ``_erfc_nonneg``: the result
    is within 1.4e-8 of x·Φ(x) computed with math.erf (measured on [-8, 8]), below float32 resolution.
    """
    x2 = x.data * x.data
    c = _erfc_nonneg(backend.xp.abs(x.data) * (1.0 / math.sqrt(2.0)))  # erfc(|x|/√2)
    phi_cdf = backend.xp.where(x.data >= 0, 1.0 - 0.5 * c, 0.5 * c)  # Φ(x)
    out = x.data * phi_cdf

    def backward(g):  # d/dx x·Φ(x) = Φ(x) + x·φ(x),  φ(x) = exp(-x²/2)/√(2π)
        return (g * (phi_cdf + x.data * backend.xp.exp(-0.5 * x2) * (1.0 / SQRT_2PI)),)

    return Tensor.from_op(out.astype(x.dtype, copy=False), (x,), "gelu_erf", backward)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / Σ exp(x) along ``axis``; the max is subtracted first so that large logits cannot overflow."""
    y = _softmax(x.data, axis)

    def backward(g):
        return (_softmax_backward(y, g, axis),)

    return Tensor.from_op(y, (x,), "softmax", backward)


@gpu.fusable
def _softmax(z: Any, axis: int) -> Any:
    """softmax of an array, in one new buffer: e = exp(z - max), then e /= Σe."""
    e = z - z.max(axis=axis, keepdims=True)
    backend.xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@gpu.fusable
def _softmax_backward(y: Any, g: Any, axis: int) -> Any:
    """The Jacobian diag(y) - y yᵀ applied to g: y ⊙ (g - ⟨g, y⟩), in one new buffer."""
    gy = g * y
    dot = gy.sum(axis=axis, keepdims=True)  # ⟨g, y⟩ per row
    gy -= y * dot  # y⊙g - y⟨g, y⟩
    return gy


def causal_attention(qkv: Tensor, n_head: int) -> Tensor:
    """Multi-head causal self-attention from the projections [q | k | v] (B, T, 3C) to the merged heads (B, T, C):
    softmax(q kᵀ / √hs, future masked) v per head, as one op.

    Fused so that the graph keeps one (B, nh, T, T) array, the attention weights, instead of four (scores, scaled,
    masked, softmax), and the heads are split and merged inside (views; one copy for the output).
    """
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head):
        raise ValueError(f"causal_attention: last axis {C3} is not 3 x n_head ({n_head}) x head size")
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    q, k, v = qkv.data.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs), views
    att = engine.matmul(q, k.swapaxes(-1, -2))  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    att = _causal_softmax(att, scale)  # (B, nh, T, T), rows sum to 1, zero above the diagonal
    y = engine.matmul(att, v)  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C), one copy

    def backward(g):  # g (B, T, C)
        g = g.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs), a view
        gqkv = backend.xp.empty((B, T, 3, n_head, hs), dtype=g.dtype)  # [dq | dk | dv] in qkv's own layout
        dq, dk, dv = gqkv.transpose(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs), views: each product is copied in once
        dv[...] = engine.matmul(att.swapaxes(-1, -2), g)  # dv = attᵀ g: (B, nh, T, T) @ (B, nh, T, hs)
        gs = _causal_softmax_backward(att, engine.matmul(g, v.swapaxes(-1, -2)), scale)  # (B, nh, T, T)
        dq[...] = engine.matmul(gs, k)  # dq = ds k: (B, nh, T, T) @ (B, nh, T, hs)
        dk[...] = engine.matmul(gs.swapaxes(-1, -2), q)  # dk = dsᵀ q: (B, nh, T, T) @ (B, nh, T, hs)
        return (gqkv.reshape(B, T, C3),)  # contiguous: a view

    return Tensor.from_op(y, (qkv,), "causal_attention", backward)


@gpu.fusable
def _causal_softmax(att: Any, scale: float) -> Any:
    """softmax(scale · scores + causal mask) over the last axis, the scores (..., T, T) overwritten on the way."""
    att *= scale  # 1/√hs keeps the softmax from saturating (Vaswani et al. §3.2.1)
    att += _causal_bias(att.shape[-1], att.dtype)  # (..., T, T) + (T, T): -inf above the diagonal, the future
    return _softmax(att, axis=-1)


@gpu.fusable
def _causal_softmax_backward(att: Any, g: Any, scale: float) -> Any:
    """The gradient of the scores before scaling: the softmax's backward, times the scale (masked entries have
    att = 0, so they get no gradient)."""
    gs = _softmax_backward(att, g, -1)
    gs *= scale
    return gs


def _causal_bias(T: int, dtype: Any) -> Any:
    """(T, T): 0 on and below the diagonal, -inf above it (added to the scores, it masks the future)."""
    xp = backend.xp
    return xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)


@gpu.fusable
def _log_softmax(z: Any, axis: int) -> Any:
    """log softmax of an array: (z - max) - log Σ exp(z - max), stable for any magnitude of z."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - backend.xp.log(backend.xp.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(x)), computed without forming softmax (no log of an underflowed 0)."""
    y = _log_softmax(x.data, axis)

    def backward(g):  # d/dx (x - logΣeˣ) = I - softmax:  g - softmax · Σg
        return (g - backend.xp.exp(y) * g.sum(axis=axis, keepdims=True),)

    return Tensor.from_op(y, (x,), "log_softmax", backward)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer ``targets`` under ``logits``.

    logits (..., V), targets (...) integers in [0, V) or ``ignore_index`` (those positions count for nothing).
    If every target is ignored the loss is 0 with a zero gradient (PyTorch returns nan; 0 keeps training alive).
    """
    xp = backend.xp
    t = backend.to_device(targets.data if isinstance(targets, Tensor) else targets)
    V = logits.shape[-1]
    if t.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {t.shape} for logits of shape {logits.shape}; "
                         f"expected targets of shape {logits.shape[:-1]}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    valid = t != ignore_index
    if bool(((t < 0) | (t >= V))[valid].any()):
        raise ValueError(f"cross_entropy: targets outside [0, {V}) (and not ignore_index={ignore_index})")
    z = logits.data.reshape(-1, V)  # (N, V)
    safe_t = xp.where(valid, t, 0).reshape(-1)  # (N,)
    logp = _log_softmax(z, axis=-1)  # (N, V)
    nll = -logp[xp.arange(z.shape[0]), safe_t] * valid.reshape(-1)  # (N,)
    n = max(int(valid.sum()), 1)

    def backward(g):
        return (_cross_entropy_backward(logp, safe_t, valid, g, n).reshape(logits.shape),)

    return Tensor.from_op(nll.sum() / n, (logits,), "cross_entropy", backward)


@gpu.fusable
def _cross_entropy_backward(logp: Any, safe_t: Any, valid: Any, g: Any, n: int) -> Any:
    """d(-log softmax_t)/dz = softmax - onehot(t), averaged over the n counted positions: (N, V)."""
    dz = backend.xp.exp(logp)
    dz[backend.xp.arange(logp.shape[0]), safe_t] -= 1.0
    dz *= (valid.reshape(-1, 1) * (g / n)).astype(dz.dtype)
    return dz


def soft_cross_entropy(logits: Tensor, probs: Any) -> Tensor:
    """Mean cross-entropy of ``logits`` against target distributions ``probs``: -Σ_v p_v log softmax(z)_v,
    averaged over positions. Distillation's loss (Hinton et al. 2015, at temperature 1): with p a teacher's
    probabilities it is KL(p ‖ softmax(z)) + H(p), so its gradient is the KL's and its minimum is z = log p.

    logits (..., V), probs (..., V) non-negative, each row summing to 1 (checked: a row off by more than 1e-3 is a
    ValueError, so raw scores cannot slip in). One-hot rows give ``cross_entropy``'s value.
    """
    xp = backend.xp
    p = backend.to_device(probs.data if isinstance(probs, Tensor) else probs)
    if p.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: probs of shape {p.shape} for logits of shape {logits.shape}")
    if p.dtype.kind != "f":
        raise TypeError(f"soft_cross_entropy: probs must be floating point, got dtype {p.dtype}")
    if bool((p < 0).any()) or bool((xp.abs(p.sum(axis=-1) - 1.0) > 1e-3).any()):
        raise ValueError("soft_cross_entropy: every row of probs must be non-negative and sum to 1")
    V = logits.shape[-1]
    z, p = logits.data.reshape(-1, V), p.reshape(-1, V)  # (N, V) each
    logq = _log_softmax(z, axis=-1)  # (N, V)
    n = z.shape[0]

    def backward(g):  # d/dz of -Σ p log softmax(z) = softmax(z)·Σp - p = q - p (rows of p sum to 1), over n rows
        dz = xp.exp(logq)
        dz -= p
        dz *= g / n
        return (dz.reshape(logits.shape).astype(logits.dtype, copy=False),)

    return Tensor.from_op(-(p * logq).sum() / n, (logits,), "soft_cross_entropy", backward)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis to zero mean and unit variance, then scale by ``weight`` and shift by ``bias``."""
    w = weight.data if weight is not None else None
    out, xhat, rstd = _layer_norm_forward(x.data, w, bias.data if bias is not None else None, eps)
    parents = tuple(p for p in (x, weight, bias) if p is not None)
    need = tuple(p is not None and p.requires_grad for p in (x, weight, bias))

    def backward(g):
        grads = _layer_norm_backward(g, xhat, rstd, w, need)
        return tuple(gr for gr, p in zip(grads, (x, weight, bias)) if p is not None)

    return Tensor.from_op(out, parents, "layer_norm", backward)


@gpu.fusable
def _layer_norm_forward(xd: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """(out, xhat, rstd): xhat = (x - mean)/√(var + eps) (..., C), rstd = 1/√(var + eps) (..., 1)."""
    xp = backend.xp
    xhat = xd - xd.mean(axis=-1, keepdims=True)  # (..., C), centred
    # einsum forms Σ xhat² row by row without an (..., C) array of squares (about 4x faster than .var here)
    var = xp.einsum("...c,...c->...", xhat, xhat)[..., None] / xhat.shape[-1]  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # (..., C), normalised in place
    out = xhat * w if w is not None else xhat.copy()
    if b is not None:
        out += b
    return out, xhat, rstd


@gpu.fusable
def _layer_norm_backward(g: Any, xhat: Any, rstd: Any, w: Any, need: tuple[bool, bool, bool]
                         ) -> tuple[Any, Any, Any]:
    """(dx, dweight, dbias), each None where ``need`` (x, weight, bias require a gradient) says so."""
    xp = backend.xp
    gxhat = g * w if w is not None else g
    lead = tuple(range(g.ndim - 1))
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (..., C) -> (N, C), a view
    gw = xp.einsum("nc,nc->c", rows(g), rows(xhat)) if need[1] else None
    gb = g.sum(axis=lead) if need[2] else None
    gx = None
    if need[0]:  # the classic layer-norm backward: remove the mean and the xhat-component of gxhat
        C = g.shape[-1]
        dot = xp.einsum("...c,...c->...", gxhat, xhat)[..., None] / C  # mean(gxhat ⊙ xhat), (..., 1)
        gx = xhat * dot
        xp.subtract(gxhat, gx, out=gx)
        gx -= gxhat.mean(axis=-1, keepdims=True)
        gx *= rstd
    return gx, gw, gb


def dropout(x: Tensor, p: float, training: bool, gen: Any = None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) ("inverted" dropout, so that
    evaluation needs no rescaling). Identity when not training or p == 0. ``gen`` is a host numpy Generator."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    gen = gen if gen is not None else backend.rng(None)
    keep = backend.to_device(gen.random(x.shape) >= p)  # drawn on the host: same seed, same mask on any backend
    scale = (keep / (1.0 - p)).astype(x.dtype)
    return Tensor.from_op(x.data * scale, (x,), "dropout", lambda g: (g * scale,))


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, C) picked by integer ``ids`` (...) -> (..., C). Backward scatter-adds into the rows
    (a token seen twice gets both gradients), and does nothing at all for a frozen table."""
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids)
    V = weight.shape[0]
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"embedding: ids in [{int(ids.min())}, {int(ids.max())}] but the table has {V} rows")

    def backward(g):
        gw = backend.xp.zeros_like(weight.data)
        backend.scatter_add(gw, ids.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (gw,)

    return Tensor.from_op(weight.data[ids], (weight,), "embedding", backward)


__all__ = ["causal_attention", "cross_entropy", "dropout", "embedding", "gelu", "gelu_erf", "layer_norm", "linear",
           "log_softmax", "softmax"]
