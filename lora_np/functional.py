"""Fused neural-network functions, each with a hand-derived backward next to its forward.

Composing these from engine ops would also work, but a fused op stores fewer intermediate arrays and its
backward is one line of calculus a reader can check. Shapes: ``B`` batch, ``T`` time, ``C`` channels,
``V`` vocabulary; ``...`` any leading dims.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend, engine
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
    out = out + bias.data if bias is not None else out
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):  # y = xW + b:  dx = g Wᵀ,  dW = xᵀ g (summed over all rows),  db = Σ g
        gx = engine.matmul(g, weight.data.T) if x.requires_grad else None
        gw = engine.matmul(x.data.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1])) if weight.requires_grad else None
        gb = g.reshape(-1, g.shape[-1]).sum(axis=0) if bias is not None and bias.requires_grad else None
        return (gx, gw, gb)[: len(parents)]

    return Tensor.from_op(out, parents, "linear", backward)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation as in GPT-2: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    x2 = x.data * x.data  # x*x, not x**2: numpy's float power is several times slower
    t = backend.xp.tanh(GELU_C * x.data * (1.0 + 0.044715 * x2))  # tanh(u), u = √(2/π)(x + 0.044715x³)
    out = 0.5 * x.data * (1.0 + t)

    def backward(g):  # product rule: 0.5(1+t) + 0.5·x·(1-t²)·du/dx,  du/dx = √(2/π)(1 + 3·0.044715·x²)
        du = GELU_C * (1.0 + 3 * 0.044715 * x2)
        return (g * (0.5 * (1.0 + t) + 0.5 * x.data * (1.0 - t * t) * du),)

    return Tensor.from_op(out, (x,), "gelu", backward)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / Σ exp(x) along ``axis``; the max is subtracted first so that large logits cannot overflow."""
    xp = backend.xp
    e = xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)

    def backward(g):  # Jacobian diag(y) - y yᵀ applied to g:  y ⊙ (g - ⟨g, y⟩)
        return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)

    return Tensor.from_op(y, (x,), "softmax", backward)


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

    def backward(g):  # d(-log softmax_t)/dz = softmax - onehot(t), averaged over the n counted positions
        dz = xp.exp(logp)
        dz[xp.arange(z.shape[0]), safe_t] -= 1.0
        dz *= (valid.reshape(-1, 1) * (g / n)).astype(dz.dtype)
        return (dz.reshape(logits.shape),)

    return Tensor.from_op(nll.sum() / n, (logits,), "cross_entropy", backward)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis to zero mean and unit variance, then scale by ``weight`` and shift by ``bias``."""
    xp = backend.xp
    mu = x.data.mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(x.data.var(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = (x.data - mu) * rstd  # (..., C)
    out = xhat * weight.data if weight is not None else xhat
    out = out + bias.data if bias is not None else out
    parents = tuple(p for p in (x, weight, bias) if p is not None)

    def backward(g):
        gxhat = g * weight.data if weight is not None else g
        gx = None
        if x.requires_grad:  # the classic layer-norm backward: remove the mean and the xhat-component of gxhat
            gx = rstd * (gxhat - gxhat.mean(axis=-1, keepdims=True)
                         - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if weight is not None and weight.requires_grad else None
        gb = g.sum(axis=lead) if bias is not None and bias.requires_grad else None
        return tuple(gr for gr, p in zip((gx, gw, gb), (x, weight, bias)) if p is not None)

    return Tensor.from_op(out, parents, "layer_norm", backward)


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


__all__ = ["cross_entropy", "dropout", "embedding", "gelu", "layer_norm", "linear", "log_softmax", "softmax"]
