"""Numerical gradient checking: the test every op of lora_np goes through.

The analytic gradient (our backward) is compared with central differences
    ∂f/∂x_i ≈ (f(x + ε e_i) - f(x - ε e_i)) / 2ε
in float64, where the truncation error is O(ε²) and round-off O(1e-16/ε): with ε = 1e-6 both are far below the
tolerance. A function with a non-scalar output is reduced to a scalar by a fixed random projection ⟨w, f(x)⟩, so
every output element is checked at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import backend
from .engine import Tensor


class GradcheckError(AssertionError):
    """Raised by ``gradcheck`` when an analytic gradient disagrees with the numerical one."""


@dataclass
class GradcheckResult:
    max_error: float  # worst |analytic - numeric| / max(1, |analytic|, |numeric|)
    input_index: int  # which input holds the worst element
    element: tuple[int, ...]  # where in that input
    analytic: float
    numeric: float

    def __str__(self) -> str:
        return (f"worst error {self.max_error:.3e} at input {self.input_index}, element {self.element}: "
                f"analytic {self.analytic:.10g} vs numeric {self.numeric:.10g}")


def gradcheck(fn: Callable[..., Tensor], *inputs: Tensor, eps: float = 1e-6, tol: float = 1e-6, seed: int = 0,
              raise_on_fail: bool = True) -> GradcheckResult:
    """Check ``fn``'s backward against central differences for every input that requires a gradient.

    Inputs must be float64 Tensors (float32 differences are too coarse to be a test). The error of an element is
    |a - n| / max(1, |a|, |n|): absolute for small gradients, relative for large ones. Raises ``GradcheckError``
    naming the worst element when that error exceeds ``tol`` (or returns the result if ``raise_on_fail=False``).
    """
    for i, t in enumerate(inputs):
        if t.requires_grad and t.dtype != backend.np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {t.dtype}; use float64 (Tensor(..., dtype=float64))")
    if not any(t.requires_grad for t in inputs):
        raise ValueError("gradcheck: no input requires_grad, nothing to check")
    out = fn(*inputs)
    w = backend.to_device(backend.rng(seed).standard_normal(out.shape))  # the fixed projection

    def scalar() -> float:
        return float((fn(*inputs).data * w).sum())

    for t in inputs:
        t.grad = None
    (out * Tensor(w)).sum().backward()

    worst = GradcheckResult(0.0, -1, (), 0.0, 0.0)
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            continue
        analytic = backend.to_numpy(t.grad) if t.grad is not None else backend.np.zeros(t.shape)
        # Nudge t.data in place by index (reshape(-1) would copy a non-contiguous array, and nudge nothing).
        for j, idx in enumerate(backend.np.ndindex(t.shape)):
            orig = float(t.data[idx])
            t.data[idx] = orig + eps
            f_plus = scalar()
            t.data[idx] = orig - eps
            f_minus = scalar()
            t.data[idx] = orig
            numeric = (f_plus - f_minus) / (2 * eps)
            a = float(analytic.reshape(-1)[j])
            err = abs(a - numeric) / max(1.0, abs(a), abs(numeric))
            if err >= worst.max_error:
                worst = GradcheckResult(err, i, idx, a, numeric)
    if raise_on_fail and worst.max_error > tol:
        raise GradcheckError(str(worst))
    return worst
