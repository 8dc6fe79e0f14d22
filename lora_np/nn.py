"""Layers: ``Module`` (the parameter tree), ``Linear``, ``Embedding``, ``LayerNorm``, ``Dropout``.

A ``Parameter`` is a Tensor that a module owns. Modules find their parameters by walking their attributes
(sub-modules, lists of sub-modules, Parameters) in the order they were set, so names are stable and readable:
``blocks.0.attn.q.weight``. Whether a parameter trains is its own ``requires_grad`` flag, nothing else: LoRA
freezes W by setting that flag, and ``trainable_parameters()`` just reads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import backend, checks
from . import functional as F
from .engine import Tensor, no_grad


class Parameter(Tensor):
    """A Tensor owned by a Module; trainable unless told otherwise."""

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)

    def refuses(self, value: Any) -> str:
        """Why this parameter cannot take the values ``value`` ("" when it can). A plain one takes any array that
        ``check_state`` passed; a 4-bit weight (``qlora.QuantizedWeight``) only the values it already holds."""
        return ""


class Module:
    """Base class: a tree of sub-modules and Parameters, with train/eval mode and state dicts."""

    training: bool = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(m, Module) for m in value):
                for i, m in enumerate(value):
                    yield f"{name}.{i}", m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()  # a Parameter shared by two modules is listed once
        for mod_name, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{mod_name}.{name}" if mod_name else name), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self) -> list[Parameter]:
        """The parameters an optimizer should update: exactly those with requires_grad=True."""
        return [p for p in self.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        """Forget accumulated gradients (backward adds into .grad, so call this between steps)."""
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        """Set training mode (dropout active) on this module and all sub-modules. Changes no weights."""
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        """Evaluation mode: dropout off. Nothing else: in particular LoRA layers are NOT merged (call merge())."""
        return self.train(False)

    @contextlib.contextmanager
    def inference(self) -> Iterator[Module]:
        """Eval mode and no graph for the block; the previous mode comes back afterwards, even on an error."""
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                yield self
        finally:
            self.train(was_training)

    def to(self, dtype: Any) -> Module:
        """Cast every parameter to ``dtype`` in place (e.g. float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def state_dict(self) -> dict[str, Any]:
        """name -> host NumPy copy of every parameter (trainable and frozen)."""
        return {name: backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy ``state`` into the parameters. Every check happens before the first write, so a bad state dict
        leaves the module untouched: names and shapes must match exactly, and every array must be finite and of a
        float dtype the parameter holds without loss (float16 into float32 is fine; float64 into float32, or an
        integer array, is refused)."""
        params = dict(self.named_parameters())
        check_state(params, state)
        refused = [f"{name}: {why}" for name, p in params.items() if (why := p.refuses(state[name]))]
        if refused:
            raise ValueError("; ".join(refused))
        for name, p in params.items():
            p.data = backend.to_device(state[name], dtype=p.dtype).copy()  # never alias the caller's arrays
            p.grad = None


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype ``check_state`` expects where there is no Parameter to compare with (a LoRA factor not
    made yet, a weight stored in another layout)."""

    shape: tuple[int, ...]
    dtype: Any


def check_state(params: dict[str, Parameter | TensorSpec], state: dict[str, Any]) -> None:
    """Raise a ValueError naming every tensor of ``state`` that cannot be loaded into ``params`` as it is:
    missing or unexpected names, wrong shapes, non-float or lossy dtypes, NaN or inf values."""
    np = backend.np
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"missing tensors {missing or 'none'}, unexpected tensors {unexpected or 'none'}")
    problems = []
    for name, p in params.items():
        value = state[name]
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            problems.append(f"{name}: not an array ({type(value).__name__})")
        elif tuple(value.shape) != p.shape:
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        elif np.dtype(value.dtype).kind != "f" or not np.can_cast(value.dtype, p.dtype, "safe"):
            problems.append(f"{name}: dtype {value.dtype} cannot be held by a {p.dtype} parameter without loss")
        elif not bool(np.isfinite(backend.to_numpy(value)).all()):
            problems.append(f"{name}: holds NaN or inf values")
    if problems:
        raise ValueError("; ".join(problems))


class Linear(Module):
    """y = x @ W + b, with W stored (d_in, d_out) so that rows of x are the inputs (the project's notation)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, std: float = 0.02, gen: Any = None) -> None:
        gen = gen if gen is not None else backend.rng(None)  # pass a seeded generator for reproducible weights
        self.d_in, self.d_out = d_in, d_out
        self.weight = Parameter(backend.randn(gen, (d_in, d_out), std))  # GPT-2 init: N(0, 0.02²)
        self.bias = Parameter(backend.xp.zeros(d_out, dtype=backend.DEFAULT_DTYPE)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., d_in) @ (d_in, d_out) + (d_out,) -> (..., d_out)

    def __repr__(self) -> str:
        return f"Linear(d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None})"


class Embedding(Module):
    """A (num, dim) table; forward picks rows by integer ids."""

    def __init__(self, num: int, dim: int, std: float = 0.02, gen: Any = None) -> None:
        gen = gen if gen is not None else backend.rng(None)  # pass a seeded generator for reproducible weights
        self.weight = Parameter(backend.randn(gen, (num, dim), std))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)  # (...) -> (..., dim)


class LayerNorm(Module):
    """Normalise the last axis, then scale (ones) and shift (zeros, optional)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        self.eps = eps
        self.weight = Parameter(backend.xp.ones(dim, dtype=backend.DEFAULT_DTYPE))
        self.bias = Parameter(backend.xp.zeros(dim, dtype=backend.DEFAULT_DTYPE)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


# A model gives each of its Dropout layers its own seed, drawn from the model's initialisation generator below this
# bound (a non-negative int32, which every seeding API accepts): the masks are then fixed by the model's seed. The
# bound is part of what that seed determines; another would change every mask.
DROPOUT_SEED_BOUND = 2**31


class Dropout(Module):
    """Inverted dropout, active only in training mode; masks come from the module's own seeded generator."""

    def __init__(self, p: float = 0.0, seed: int | None = 0) -> None:
        self.p = checks.probability(p, "Dropout: p")
        self.gen = backend.rng(seed)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.gen)
