"""Optimizers (SGD, AdamW), global gradient-norm clipping and the cosine learning-rate schedule.

An optimizer only ever touches two fields of a parameter ``Tensor``: it reads ``.grad`` and updates ``.data``
in place (``p.data -= ...``), so every layer that holds a reference to that array sees the new values.

The optimizer is handed the trainable parameters only, so its state is sized by what LoRA trains. That is
where LoRA's memory saving lives: AdamW keeps two numbers (m and v) per trainable number, and with rank-r
adapters on a (d_in, d_out) weight that is 2·r·(d_in + d_out) numbers instead of 2·d_in·d_out for full
fine-tuning: no optimizer state for the frozen weights (Hu et al. 2021, §4.2). ``state_nbytes()`` reports
it for the memory ledger.

A typical step::

    opt.lr = cosine_lr(step, max_lr=3e-4, max_steps=1000, warmup_steps=100)
    opt.zero_grad()                    # gradients accumulate with += in backward; clear them first
    loss.backward()
    clip_grad_norm(params, max_norm=1.0)
    opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import backend, gpu

if TYPE_CHECKING:
    from .engine import Tensor


class Optimizer:
    """Base class: holds the trainable parameters, one state dict per parameter, and a public ``lr``.

    Subclasses implement ``_update(p, g, state)`` for one parameter; ``step()`` calls it for every parameter
    that received a gradient. There are no parameter groups: one ``lr`` (and one weight decay) for every
    parameter given; the caller chooses which parameters to pass.
    """

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        if hasattr(params, "data") and hasattr(params, "requires_grad"):
            raise TypeError("params must be an iterable of Tensors (e.g. a list), not a single Tensor")
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list; pass the trainable parameters to train")
        seen: set[int] = set()
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                # The optimizer's state is sized by what it holds (AdamW keeps 2 × trainable numbers), so a
                # frozen tensor here would silently cost memory and, with weight decay, even change W0.
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.data.shape)}) has requires_grad=False; the optimizer holds "
                    "only trainable parameters, so its state is sized by what LoRA trains (AdamW keeps "
                    "2 × trainable numbers). Pass only the trainable ones, e.g. model.trainable_parameters()"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {i} appears twice in the list; it would be updated twice per step")
            seen.add(id(p))
        _check_nonnegative(lr=lr)
        self.lr = lr  # public: the learning-rate schedule sets it before every step
        self.state: list[dict[str, Any]] = [{} for _ in self.params]  # filled lazily on a parameter's first step

    def zero_grad(self) -> None:
        """Forget every gradient (``.grad = None``).

        Backward accumulates gradients with ``+=`` (so a tensor used twice gets both contributions), which
        means gradients from the previous step are still there until cleared: call this between steps.
        """
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient; one whose ``.grad is None`` is left untouched."""
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is None:  # not reached by this loss (e.g. an adapter that was not used): nothing to do
                continue
            self._update(p, p.grad, state)

    def _update(self, p: Tensor, g: Any, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's state arrays (momentum buffers, Adam moments); 0 before the first step."""
        return sum(int(v.nbytes) for state in self.state for v in state.values() if hasattr(v, "nbytes"))


class SGD(Optimizer):
    """Stochastic gradient descent with classic (heavy-ball) momentum and L2 weight decay.

    Per step, with gradient g (as in PyTorch's SGD with dampening=0, nesterov=False)::

        g ← g + wd · p          # L2 decay: added to the gradient, so momentum carries it too
        v ← μ · v + g           # momentum buffer (Polyak 1964), v = g on the first step
        p ← p − lr · v

    The momentum buffer (one array per parameter) is allocated only when momentum > 0.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        _check_nonnegative(momentum=momentum, weight_decay=weight_decay)
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _update(self, p: Tensor, g: Any, state: dict[str, Any]) -> None:
        if self.weight_decay != 0.0:
            g = g + self.weight_decay * p.data  # a new array: p.grad itself is left as backward computed it
        if self.momentum != 0.0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = backend.xp.zeros_like(p.data)
            v = state["momentum_buffer"]
            v *= self.momentum
            v += g
            g = v
        p.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization").

    The update is PyTorch's documented AdamW algorithm, step t counted per parameter, g its gradient::

        p ← p − lr · wd · p                     # decoupled decay: shrinks p directly, never enters m or v
        m ← β1 · m + (1 − β1) · g               # first moment  (Kingma & Ba 2015, Alg. 1)
        v ← β2 · v + (1 − β2) · g²              # second moment
        m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)  # bias correction: m, v start at 0 (Kingma & Ba §3)
        p ← p − lr · m̂ / (√v̂ + ε)

    Why decoupled: with Adam, L2 decay added to g is divided by √v̂, so weights with large gradients are
    barely decayed; AdamW decays every weight at the same rate lr·wd (Loshchilov & Hutter §2).

    Weight decay applies to every parameter given (no exclusion list for biases or norms): the caller decides
    what to pass. For LoRA that means decay pulls A and B, hence ΔW = A·B, towards 0, i.e. towards W0.

    State: m and v, allocated lazily with ``zeros_like`` on a parameter's first step, so the state is exactly
    2 × the trainable numbers (in the parameters' dtype).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr)
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {betas}")
        _check_nonnegative(eps=eps, weight_decay=weight_decay)
        self.betas = (beta1, beta2)
        self.eps = eps
        self.weight_decay = weight_decay

    def _update(self, p: Tensor, g: Any, state: dict[str, Any]) -> None:
        xp = backend.xp
        if not state:
            state["step"] = 0
            state["m"] = xp.zeros_like(p.data)
            state["v"] = xp.zeros_like(p.data)
        state["step"] += 1
        _adamw_update(p.data, g, state["m"], state["v"], self.lr, self.weight_decay, self.betas, self.eps,
                      state["step"])


@gpu.fusable
def _adamw_update(p: Any, g: Any, m: Any, v: Any, lr: float, weight_decay: float, betas: tuple[float, float],
                  eps: float, t: int) -> None:
    """AdamW's step ``t`` for one parameter's array ``p``, its gradient ``g`` and moments ``m``, ``v``, in place."""
    xp = backend.xp
    beta1, beta2 = betas
    p *= 1.0 - lr * weight_decay  # decoupled weight decay, on the pre-update p

    # One scratch array per step (`buf`), reused for each intermediate, so no other temporaries.
    buf = xp.multiply(g, 1.0 - beta1)
    m *= beta1
    m += buf  # m = β1·m + (1−β1)·g
    xp.multiply(g, g, out=buf)
    buf *= 1.0 - beta2
    v *= beta2
    v += buf  # v = β2·v + (1−β2)·g²

    # lr·m̂/(√v̂ + ε) written as (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε): the bias corrections become
    # two scalars instead of two full-size arrays (the same rearrangement PyTorch uses).
    step_size = lr / (1.0 - beta1**t)
    xp.sqrt(v, out=buf)
    buf /= math.sqrt(1.0 - beta2**t)
    buf += eps  # buf = √v̂ + ε
    xp.divide(m, buf, out=buf)
    buf *= step_size
    p -= buf


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``; return the norm before.

    The norm is taken over all gradients as one long vector (tensors with ``.grad is None`` skipped), and every
    gradient is multiplied by the same factor, so the update's direction is kept and only its length is capped
    (Pascanu et al. 2013, §3.2). Gradients already within ``max_norm`` are left alone.

    A non-finite norm (inf or nan from an overflow) is returned without scaling anything: the caller decides
    whether to skip the step. The value is a Python float, which on the GPU costs one device sync.
    """
    if math.isnan(max_norm) or max_norm < 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    xp = backend.xp
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # Norm of the per-tensor norms = norm of the concatenation, without building the concatenation.
    total = float(xp.linalg.norm(xp.stack([xp.linalg.norm(g.ravel()) for g in grads])))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / total  # total > max_norm >= 0, so no division by zero (PyTorch adds 1e-6 instead)
        for g in grads:
            g *= scale
    return total


def cosine_lr(step: int, *, max_lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at ``step``: linear warmup 0 → max_lr, then cosine decay to min_lr at ``max_steps``.

    - ``step < warmup_steps``: ``max_lr · step / warmup_steps`` (so step 0 has lr 0).
    - ``warmup_steps <= step <= max_steps``: half a cosine from max_lr down to min_lr
      (Loshchilov & Hutter 2017, SGDR, Eq. 5, without restarts).
    - ``step > max_steps``: min_lr.

    Warmup keeps the first Adam steps small while its second-moment estimate v is still based on few
    gradients (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond", §3).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    if not 0 <= warmup_steps <= max_steps:
        raise ValueError(f"warmup_steps must be in [0, max_steps={max_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr <= max_lr:  # also rejects nan
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 → 1 over the decay phase
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _check_nonnegative(**hyperparameters: float) -> None:
    for name, value in hyperparameters.items():
        if not value >= 0.0:  # written this way so nan fails too
            raise ValueError(f"{name} must be >= 0, got {value}")
