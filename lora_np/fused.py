"""The fast path of every Linear and LoRA layer of the model: several layers that read the same x, as one op.

The lesson is ``lora.lora_linear``: one LoRA layer, its forward and its backward on one screen. ``fused_linear``
computes the same thing (tests/test_fused.py checks the values and every gradient against it) for any number of
layers at once, with two speed-ups, each measured (benchmarks/README.md):

* x @ W + s·(x@A)@B = x @ (W + s·A@B): without dropout the adapter is merged on the fly (Hu et al. §4.2's merge,
  per step). Merging costs d_in·r·d_out multiply-adds instead of the N·r·d_out of h @ B, and backward's dx is
  g @ W'ᵀ alone instead of g @ Wᵀ + (s·g Bᵀ) Aᵀ.
* layers that read the same x share their products: x @ [W'_1 ... W'_n] and x @ [A_1 ... A_n] are one product
  each, as are dx = g @ [W'_1 ... W'_n]ᵀ and dA = xᵀ @ [dh_1 ... dh_n]: BLAS is faster on one wide matrix than on
  n narrow ones, and the thin rank-r products are the slowest per FLOP of the whole step.

Merging on the fly rounds differently from the lesson's (x@A)@B, so the two agree to float rounding, not bit for
bit; the model (``LoRALinear.forward``, ``lora.shared_input_linear``) always runs this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from . import backend, engine
from .engine import Tensor


class LinearPart(NamedTuple):
    """One layer that reads x: y = x @ W + b + s·((x ⊙ keep) @ A) @ B. A plain Linear is ``LinearPart(W, b)``."""

    W: Tensor  # (d_in, d_out), frozen under LoRA
    b: Tensor | None = None  # (d_out,), or no bias
    A: Tensor | None = None  # (d_in, r); None: a plain Linear (and B, s, keep are unused)
    B: Tensor | None = None  # (r, d_out)
    s: float = 0.0  # the scaling α / r (α / √r with rsLoRA)
    keep: Any = None  # LoRA's dropout mask on x, shape of x, already divided by 1 - p; None: no dropout

    @property
    def merged(self) -> bool:
        """An adapter without dropout: it reads x itself, so it is folded into W (W' = W + s·A@B)."""
        return self.A is not None and self.keep is None


def fused_linear(x: Tensor, parts: Sequence[LinearPart]) -> Tensor:
    """y_i = x @ W_i + b_i + s_i·((x ⊙ keep_i) @ A_i) @ B_i for every part i, concatenated on the last axis.

    Shapes: x (..., d_in), W_i (d_in, d_i), b_i (d_i,), A_i (d_in, r_i), B_i (r_i, d_i) -> y (..., Σ d_i). One op
    with its backward below; the graph keeps x, the thin h_i = (x ⊙ keep_i) @ A_i (..., r_i) and the merged
    weights (d_in, Σ d_i) (if x needs a gradient).
    """
    xp, mm = backend.xp, engine.matmul
    d_in, lead = x.shape[-1], x.shape[:-1]
    ends = backend.np.cumsum([p.W.shape[1] for p in parts]).tolist()  # column where each part's output ends
    cols = [slice(lo, hi) for lo, hi in zip([0, *ends], ends)]  # part i's columns of y
    D = ends[-1]
    x2 = x.data.reshape(-1, d_in)  # (N, d_in), a view
    merged = [i for i, p in enumerate(parts) if p.merged]  # adapters folded into W, sharing one x @ [A_i ...]
    dropped = [i for i, p in enumerate(parts) if p.A is not None and p.keep is not None]  # adapters on x ⊙ keep

    # W'_i = W_i + s_i·A_i B_i where the adapter reads x itself; = W_i elsewhere
    Ws = [p.W.data + p.s * mm(p.A.data, p.B.data) if p.merged else p.W.data for p in parts]
    Wcat = xp.concatenate(Ws, axis=1) if len(parts) > 1 else Ws[0]  # (d_in, D)
    # every x @ W'_i in one product: (N, d_in) @ (d_in, D) -> (N, D). One part multiplies x in its own shape, as
    # F.linear does: NumPy rounds a batched (B, T, d_in) product and the flat one differently, and a LoRA layer at
    # initialisation must give the plain Linear's outputs bit for bit
    y = mm(x2, Wcat) if len(parts) > 1 else mm(x.data, Wcat).reshape(-1, D)
    hs: dict[int, Any] = {}  # part i -> h_i = (x ⊙ keep_i) @ A_i (N, r_i)
    if merged:  # h_i = x @ A_i for every merged adapter, one thin product: (N, d_in) @ (d_in, Σr) -> (N, Σr)
        h = mm(x2, xp.concatenate([parts[i].A.data for i in merged], axis=1))
        r_ends = backend.np.cumsum([parts[i].A.shape[1] for i in merged]).tolist()
        hs.update({i: h[:, lo:hi] for i, lo, hi in zip(merged, [0, *r_ends], r_ends)})  # views
    for i in dropped:  # with dropout the low-rank path reads x ⊙ keep: added separately
        p = parts[i]
        hs[i] = mm(x2 * p.keep.reshape(-1, d_in), p.A.data)  # (N, r)
        y[:, cols[i]] += p.s * mm(hs[i], p.B.data)  # + s·h @ B: (N, r) @ (r, d_i)
    for p, c in zip(parts, cols):
        if p.b is not None:
            y[:, c] += p.b.data  # in place, in the product's own buffer
    flat = [t for p in parts for t in (p.W, p.b, p.A, p.B) if t is not None]  # the parents, in order
    Wcat = Wcat if x.requires_grad else None  # backward needs the merged weights only for dx

    def backward(g):  # g = dL/dy (..., D)
        g2 = g.reshape(-1, D)  # (N, D)
        gx = (mm(g2, Wcat.T) if len(parts) > 1 else mm(g, Wcat.T).reshape(-1, d_in)) if x.requires_grad \
            else None  # dx = Σ g_i W'_iᵀ: one product (N, D) @ (D, d_in); one part in g's shape, as F.linear
        dhs = {i: parts[i].s * mm(g2[:, cols[i]], parts[i].B.data.T) for i in hs}  # dh_i = s·g_i B_iᵀ (N, r)
        gA_merged = gW_all = None
        if merged and all(parts[i].A.requires_grad for i in merged):  # dA_i = xᵀ dh_i, all in one product
            gA_merged = mm(x2.T, xp.concatenate([dhs[i] for i in merged], axis=1))  # (d_in, Σr)
        if len(parts) > 1 and all(p.W.requires_grad for p in parts):  # dW_i = xᵀ g_i, all in one product
            gW_all = mm(x2.T, g2)  # (d_in, N) @ (N, D) -> (d_in, D)
        grads, r0 = [], 0
        for i, p in enumerate(parts):
            gi = g2[:, cols[i]]  # dL/dy_i (N, d_i), a view
            gW = gW_all[:, cols[i]] if gW_all is not None else mm(x2.T, gi) if p.W.requires_grad else None
            gb = gi.sum(axis=0) if p.b is not None and p.b.requires_grad else None
            gA = gB = None
            if p.A is not None:
                km = None if p.keep is None else p.keep.reshape(-1, d_in)  # (N, d_in)
                if gA_merged is not None and p.merged:
                    gA, r0 = gA_merged[:, r0:r0 + p.A.shape[1]], r0 + p.A.shape[1]
                elif p.A.requires_grad:  # dA = (x ⊙ keep)ᵀ dh: 0 while B = 0
                    gA = mm((x2 if km is None else x2 * km).T, dhs[i])
                gB = p.s * mm(hs[i].T, gi) if p.B.requires_grad else None  # dB = s·hᵀ g
                if km is not None and x.requires_grad:  # dx through the unmerged low-rank path: (dh Aᵀ) ⊙ keep
                    gx += (mm(dhs[i], p.A.data.T) * km).reshape(gx.shape)
            grads += [gr for gr, t in zip((gW, gb, gA, gB), (p.W, p.b, p.A, p.B)) if t is not None]
        return (None if gx is None else gx.reshape(*lead, d_in), *grads)

    return Tensor.from_op(y.reshape(*lead, D), (x, *flat), "fused_linear", backward)
