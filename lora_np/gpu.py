"""Fused CuPy kernels: a training step's elementwise chains in one GPU launch each, used on the CuPy backend.

Why: on a GPU each NumPy-style array operation is one kernel launch and one trip through memory. GELU is 9 of
them forward and 12 backward, AdamW 14 per parameter, layer norm about 10 backward; at the bench configuration
most of a CuPy step's time went to launches outside the matrix products (issue 19's profile). Here each chain is one
``ElementwiseKernel`` and each row statistic (a mean, a max, a sum of exponentials) one ``ReductionKernel``.

The NumPy code stays the lesson. Each function here replaces the reference helper of the same name (with a leading
underscore) in ``functional.py`` or ``optim.py``: same arguments, same arrays returned, and the same arrays kept for
the backward pass, so the memory ledger holds on both backends. A reference helper carries ``@fusable``, which
calls the function here instead when ``fused_enabled()`` (the backend is CuPy, ``LORA_NP_FUSED`` is not "0") and
every floating-point array is float32; anything else (NumPy, float64 as gradcheck uses, an axis other than the last)
runs the reference. ``tests/test_gpu.py`` checks every kernel against its reference on a GPU when one is there, and
everywhere else with the same kernel sources compiled by the host's C++ compiler (``tests/cuda_emulator.py``).

This module imports no array library: CuPy's kernel classes are ``backend.xp.ElementwiseKernel`` and
``backend.xp.ReductionKernel`` when the backend is CuPy, and a kernel is built on its first call.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import backend

FLAG = "LORA_NP_FUSED"  # "0" runs the reference NumPy-style code on CuPy too (benchmarks compare the two)


def fused_enabled() -> bool:
    """True when the ops should run the kernels here: the backend is CuPy and ``LORA_NP_FUSED`` is "1" or unset."""
    if backend.get_backend() != "cupy":
        return False
    if error := flag_error():
        raise ValueError(error)
    return os.environ.get(FLAG, "1") == "1"


def flag_error() -> str:
    """What is wrong with ``LORA_NP_FUSED`` ("" if nothing): the command line says it before any work."""
    flag = os.environ.get(FLAG, "1")
    if flag in ("0", "1"):
        return ""
    return f"{FLAG}={flag!r}: expected '0' (reference code) or '1' (fused kernels on CuPy)"


def fusable(reference: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a reference helper ``_name``: on CuPy with float32 arrays, call ``gpu.name`` instead.

    The function here may return ``NotImplemented`` for a case it does not cover (the reference then runs).
    """
    name = reference.__name__.lstrip("_")

    @functools.wraps(reference)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if fused_enabled() and _all_float32((*args, *kwargs.values())):
            out = globals()[name](*args, **kwargs)
            if out is not NotImplemented:
                return out
        return reference(*args, **kwargs)

    return dispatch


def _all_float32(values: tuple[Any, ...]) -> bool:
    """Every floating-point array among ``values`` is float32 (the kernels' one type); other values are ignored."""
    return all(v.dtype == backend.np.float32 for v in values if getattr(v, "dtype", None) is not None
               and v.dtype.kind == "f")


# ---------------------------------------------------------------------------------------------------------- kernels
# A kernel is a spec (its CUDA source in CuPy's ElementwiseKernel / ReductionKernel form), built on first use by
# ``compile_kernel``. In the sources: ``i`` is the flat index of an element kernel, ``raw`` parameters are indexed by
# hand, ``_in_ind.size() / _out_ind.size()`` is the number of elements each reduction output sums.


@dataclass(frozen=True)
class Elementwise:
    """One element per thread: ``body`` assigns the outputs (references) from the inputs of element ``i``."""

    name: str
    in_params: str
    out_params: str
    body: str


@dataclass(frozen=True)
class Reduction:
    """``a`` = reduce_expr over the elements of ``map_expr``, starting at ``identity``; then ``post_map_expr``."""

    name: str
    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str


def compile_kernel(spec: Elementwise | Reduction) -> Callable[..., Any]:
    """The CuPy kernel of ``spec`` (tests replace this function with a CPU build of the same source)."""
    xp = backend.xp
    if isinstance(spec, Elementwise):
        return xp.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, spec.name)
    return xp.ReductionKernel(spec.in_params, spec.out_params, spec.map_expr, spec.reduce_expr,
                              spec.post_map_expr, spec.identity, spec.name)


_built: dict[Elementwise | Reduction, Callable[..., Any]] = {}


def _kernel(spec: Elementwise | Reduction) -> Callable[..., Any]:
    if spec not in _built:
        _built[spec] = compile_kernel(spec)
    return _built[spec]


def _f(x: float) -> str:
    """A float literal for the CUDA C++ source: repr round-trips, so the source names the exact constant."""
    return f"{float(x)!r}f"


N_PER_OUTPUT = "(float)(_in_ind.size() / _out_ind.size())"  # a reduction output's number of elements
FLOAT_MAX = "3.402823466e+38f"  # the identity of a max (-FLT_MAX): every row reduced here has a finite element

ROW_MAX = Reduction("lora_np_row_max", "float32 z", "float32 m", "z", "fmaxf(a, b)", "m = a", f"-{FLOAT_MAX}")
ROW_SUM_EXP = Reduction("lora_np_row_sum_exp", "float32 z, float32 m", "float32 s", "expf(z - m)", "a + b",
                        "s = a", "0")
ROW_MEAN = Reduction("lora_np_row_mean", "float32 x", "float32 mean", "x", "a + b",
                     f"mean = a / {N_PER_OUTPUT}", "0")
SUM_OF_PRODUCTS = Reduction("lora_np_sum_of_products", "float32 x, float32 y", "float32 s", "x * y", "a + b",
                            "s = a", "0")
MEAN_OF_PRODUCTS = Reduction("lora_np_mean_of_products", "float32 x, float32 y", "float32 s", "x * y", "a + b",
                             f"s = a / {N_PER_OUTPUT}", "0")
MEAN_OF_TRIPLES = Reduction("lora_np_mean_of_triples", "float32 x, float32 y, float32 z", "float32 s", "x * y * z",
                            "a + b", f"s = a / {N_PER_OUTPUT}", "0")


def row_max(z: Any) -> Any:
    """(..., K) -> (..., 1): the max of each row."""
    return _kernel(ROW_MAX)(z, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------------------- GELU
GELU_C, GELU_K = math.sqrt(2.0 / math.pi), 0.044715  # functional.GELU_C and the cubic's coefficient

GELU_FORWARD = Elementwise(
    "lora_np_gelu_forward", "float32 x", "float32 y, float32 t",
    f"t = tanhf({_f(GELU_C)} * (x + {_f(GELU_K)} * x * x * x)); y = 0.5f * x * (1.0f + t);")
GELU_BACKWARD = Elementwise(
    "lora_np_gelu_backward", "float32 x, float32 t, float32 g", "float32 dx",
    f"float dudx = {_f(GELU_C)} * (1.0f + {_f(3 * GELU_K)} * x * x);"
    " dx = g * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dudx);")


def gelu_forward(x: Any) -> tuple[Any, Any]:
    """functional._gelu_forward: (out, t = tanh(u)) in one launch instead of nine."""
    return _kernel(GELU_FORWARD)(x)


def gelu_backward(x: Any, t: Any, g: Any) -> Any:
    """functional._gelu_backward: dx in one launch instead of twelve."""
    return _kernel(GELU_BACKWARD)(x, t, g)


# ------------------------------------------------------------------------------------------------------- layer norm
NORMALIZE = Elementwise(
    "lora_np_layer_norm", "float32 x, float32 mean, float32 rstd, float32 w, float32 b", "float32 xhat, float32 y",
    "xhat = (x - mean) * rstd; y = xhat * w + b;")
LAYER_NORM_DX = Elementwise(
    "lora_np_layer_norm_dx", "float32 g, float32 w, float32 xhat, float32 dot, float32 mean_g, float32 rstd",
    "float32 dx", "dx = (g * w - xhat * dot - mean_g) * rstd;")


@functools.cache
def _row_rstd(eps: float) -> Reduction:
    """1/√(var + eps) of each row, var the mean of (x - mean)²: eps is written into the source."""
    return Reduction("lora_np_row_rstd", "float32 x, float32 mean", "float32 rstd", "(x - mean) * (x - mean)",
                     "a + b", f"rstd = 1.0f / sqrtf(a / {N_PER_OUTPUT} + {_f(eps)})", "0")


def layer_norm_forward(x: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any, Any]:
    """functional._layer_norm_forward: (out, xhat, rstd) in three launches (mean, 1/std, normalize)."""
    mean = _kernel(ROW_MEAN)(x, axis=-1, keepdims=True)  # (..., 1)
    rstd = _kernel(_row_rstd(float(eps)))(x, mean, axis=-1, keepdims=True)  # (..., 1)
    w = 1.0 if weight is None else weight  # y = xhat·1 + 0 = xhat exactly
    b = 0.0 if bias is None else bias
    xhat, out = _kernel(NORMALIZE)(x, mean, rstd, w, b)  # (..., C) each
    return out, xhat, rstd


def layer_norm_backward(g: Any, xhat: Any, rstd: Any, weight: Any, need: tuple[bool, bool, bool]
                        ) -> tuple[Any, Any, Any]:
    """functional._layer_norm_backward: (dx, dweight, dbias), each None where ``need`` says so."""
    C = g.shape[-1]
    rows = lambda a: a.reshape(-1, C)  # noqa: E731  (..., C) -> (N, C)
    w = 1.0 if weight is None else weight
    gx = gw = gb = None
    if need[1]:
        gw = _kernel(SUM_OF_PRODUCTS)(rows(g), rows(xhat), axis=0)  # Σ over rows of g ⊙ xhat: (C,)
    if need[2]:
        gb = rows(g).sum(axis=0)  # (C,)
    if need[0]:  # gxhat = g ⊙ w is never formed: each reduction multiplies it out
        if weight is None:
            gxhat_mean = _kernel(ROW_MEAN)(g, axis=-1, keepdims=True)  # mean(gxhat), (..., 1)
            dot = _kernel(MEAN_OF_PRODUCTS)(g, xhat, axis=-1, keepdims=True)  # mean(gxhat ⊙ xhat), (..., 1)
        else:
            gxhat_mean = _kernel(MEAN_OF_PRODUCTS)(g, weight, axis=-1, keepdims=True)
            dot = _kernel(MEAN_OF_TRIPLES)(g, weight, xhat, axis=-1, keepdims=True)
        gx = _kernel(LAYER_NORM_DX)(g, w, xhat, dot, gxhat_mean, rstd)  # (..., C)
    return gx, gw, gb


# ---------------------------------------------------------------------------------------------------------- softmax
SOFTMAX = Elementwise("lora_np_softmax", "float32 z, float32 m, float32 s", "float32 y", "y = expf(z - m) / s;")
LOG_SOFTMAX = Elementwise("lora_np_log_softmax", "float32 z, float32 m, float32 s", "float32 y",
                          "y = (z - m) - logf(s);")
SOFTMAX_BACKWARD = Elementwise("lora_np_softmax_backward", "float32 y, float32 g, float32 dot, float32 scale",
                               "float32 dz", "dz = y * (g - dot) * scale;")
CAUSAL_SCALE = Elementwise(  # the scores (..., T, T) in place: scaled on and below the diagonal, -inf above it
    "lora_np_causal_scale", "float32 scale, int64 cols, float32 masked", "float32 z",
    "long long col = i % cols, row = (i / cols) % cols; z = col > row ? masked : z * scale;")


def _over_rows(z: Any, axis: int, finish: Elementwise) -> Any:
    """``finish(z, max, Σ exp(z - max))`` of each row of the last axis: three launches; other axes: NotImplemented."""
    if axis not in (-1, z.ndim - 1):
        return NotImplemented
    m = row_max(z)  # (..., 1)
    s = _kernel(ROW_SUM_EXP)(z, m, axis=-1, keepdims=True)  # (..., 1)
    return _kernel(finish)(z, m, s)


def softmax(z: Any, axis: int) -> Any:
    """functional._softmax: three launches (max, Σ exp, divide) instead of five."""
    return _over_rows(z, axis, SOFTMAX)


def log_softmax(z: Any, axis: int) -> Any:
    """functional._log_softmax: three launches instead of six."""
    return _over_rows(z, axis, LOG_SOFTMAX)


def softmax_backward(y: Any, g: Any, axis: int) -> Any:
    """functional._softmax_backward: y ⊙ (g - ⟨g, y⟩) in two launches."""
    return causal_softmax_backward(y, g, 1.0) if axis in (-1, y.ndim - 1) else NotImplemented


def causal_softmax(att: Any, scale: float) -> Any:
    """functional._causal_softmax: scale, mask the future and normalize (B, nh, T, T) scores in four launches."""
    att = backend.xp.ascontiguousarray(att)  # the mask reads row and column from the flat index
    _kernel(CAUSAL_SCALE)(scale, att.shape[-1], -math.inf, att)
    return softmax(att, -1)


def causal_softmax_backward(att: Any, g: Any, scale: float) -> Any:
    """functional._causal_softmax_backward: y ⊙ (g - ⟨g, y⟩) · scale, y the attention weights, in two launches."""
    dot = _kernel(SUM_OF_PRODUCTS)(g, att, axis=-1, keepdims=True)  # (..., 1)
    return _kernel(SOFTMAX_BACKWARD)(att, g, dot, scale)


# ---------------------------------------------------------------------------------------------------- cross-entropy
CROSS_ENTROPY_BACKWARD = Elementwise(
    "lora_np_cross_entropy_backward",
    "float32 logp, raw int64 t, raw bool valid, float32 g, int64 counted, int64 vocab", "float32 dz",
    "long long row = i / vocab; float d = expf(logp) - (i % vocab == t[row] ? 1.0f : 0.0f);"
    " dz = valid[row] ? d * (g / (float)counted) : 0.0f;")


def cross_entropy_backward(logp: Any, safe_t: Any, valid: Any, g: Any, n: int) -> Any:
    """functional._cross_entropy_backward: (softmax - onehot) ⊙ valid · g/n over (N, V) in one launch."""
    xp = backend.xp
    logp = xp.ascontiguousarray(logp)  # the row and column come from the flat index
    dz = xp.empty_like(logp)
    t = xp.ascontiguousarray(safe_t.reshape(-1), dtype=xp.int64)  # (N,)
    ok = xp.ascontiguousarray(valid.reshape(-1))  # (N,) bool
    return _kernel(CROSS_ENTROPY_BACKWARD)(logp, t, ok, g, n, logp.shape[-1], dz)


# ------------------------------------------------------------------------------------------------------------ AdamW
ADAMW = Elementwise(
    "lora_np_adamw", "float32 g, float32 decay, float32 beta1, float32 c1, float32 beta2, float32 c2, "
    "float32 step_size, float32 bias2, float32 eps", "float32 p, float32 m, float32 v",
    "p = p * decay; m = beta1 * m + c1 * g; v = beta2 * v + c2 * (g * g);"
    " p = p - m / (sqrtf(v) / bias2 + eps) * step_size;")


def adamw_update(p: Any, g: Any, m: Any, v: Any, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, t: int) -> None:
    """optim._adamw_update: decay, both moments and the step for one parameter in one launch, in place."""
    beta1, beta2 = betas
    _kernel(ADAMW)(g, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / (1.0 - beta1**t),
                   math.sqrt(1.0 - beta2**t), eps, p, m, v)
