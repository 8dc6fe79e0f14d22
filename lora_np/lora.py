"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685), made explicit.

A pretrained weight W (d_in, d_out) is frozen. What trains is a low-rank update ΔW = A @ B with
A (d_in, r) and B (r, d_out), r << min(d_in, d_out), scaled by s = α / r:

    y = x @ W + b + s · (x @ A) @ B                                        (x is a row vector, or rows of a batch)

A d x d layer then trains 2·d·r numbers instead of d², and W needs neither a gradient nor optimizer state.

Notation. This project uses row vectors and ``y = x @ W`` with W stored (d_in, d_out). The paper writes column
vectors, h = W0 x + ΔW x = W0 x + B A x, with B (d, r) and A (r, k). Transposing the paper's equation gives ours:
    paper A (r, d_in)  = our A.T        paper B (d_out, r) = our B.T        paper B·A = (our A @ B).T
so the roles are the same: our A is the paper's A (the random "down" projection, initialised randomly) and our
B is the paper's B (the "up" projection, initialised to zero, §4.1). In peft and loralib, ``lora_A.weight`` is
(r, d_in) = our A.T and ``lora_B.weight`` is (d_out, r) = our B.T; ``scaling`` = α / r there too, and rsLoRA's
α / √r (Kalajdzievski 2023) is ``rslora=True`` here as in peft.

A setup is one ``LoRAConfig``, peft's ``LoraConfig`` field for field: ``r`` = ``r``, ``alpha`` = ``lora_alpha``,
``targets`` = ``target_modules`` (our ``q, k, v, o, up, down`` are the ``q_proj, k_proj, v_proj, o_proj,
up_proj/fc1, down_proj/fc2`` of real models), ``dropout`` = ``lora_dropout``, ``rslora`` = ``use_rslora``,
``modules_to_save`` = ``modules_to_save``, ``dora`` = ``use_dora``, ``init="pissa"`` = ``init_lora_weights="pissa"``;
``zero`` and ``seed`` have no peft field (peft always zeroes B).

Two variants change what A and B mean, each one field of the config:

* DoRA (Liu et al. 2024, ``dora=True``): W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖_col. With y = x @ W the columns of W
  are the output units, so the norm is taken over d_in, one per output column, and m (d_out,) is a trained
  magnitude per column, initialised to W's column norms so the model starts at the base. LoRA adapts the direction
  only. ``dora_linear`` is its op; its backward is the exact gradient, through the norm too (see there).
* PiSSA (Meng et al. 2024, ``init="pissa"``): A and B start as W's top-r singular triplets, A = U_r √(S_r/s) and
  B = √(S_r/s) V_rᵀ, so s·A·B = U_r S_r V_rᵀ is W's best rank-r part, and the frozen W is replaced by the residual
  W − s·A·B: the model starts where it was, and training moves the principal part instead of a zero update.

Merging is explicit: ``merge()`` folds s·A·B into W so inference costs exactly what the base model costs, and
``unmerge()`` takes it out again (DoRA: W ← m ⊙ (W + s·A·B)/‖·‖_col, and unmerge puts the W it kept back, bit for
bit). ``eval()`` never merges. Which parameters train is decided by structure: a
``LoRALinear`` knows its A and B, and ``apply_lora`` freezes everything else (no name matching).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from . import backend, checks, engine
from . import functional as F
from .engine import Tensor
from .fused import LinearPart, fused_linear
from .nn import Linear, Module, Parameter

TARGETS = ("q", "k", "v", "o", "up", "down")  # the Linear layers inside each block that LoRA can adapt
EXTRA_MODULES = ("wte", "wpe", "lm_head", "ln_f")  # top-level modules one may train fully (peft: modules_to_save)


# α beyond this is no setup anyone trains (published ones stay below a few thousand); s·A·B would blow up float32
# activations, and an adapter file claiming it is refused as malformed.
MAX_ALPHA = 1e4


INITS = ("random", "pissa")  # LoRAConfig.init: peft's init_lora_weights=True and ="pissa"
# fields added after adapter files were first written, with the value such a file means (plain LoRA)
ADDED_FIELDS = {"dora": False, "init": "random"}


@dataclass(frozen=True)
class LoRAConfig:
    """The one description of a LoRA setup (peft's ``LoraConfig``: ``r``, ``lora_alpha``, ``target_modules``,
    ``lora_dropout``, ``use_rslora``, ``modules_to_save``). It checks itself completely when it is made, so a
    config that exists is valid, and nothing downstream re-checks loose arguments.

    ``targets`` and ``modules_to_save`` accept ``"q,v"``, ``"all-linear"`` or a list; they are stored as tuples
    in a fixed order, so two configs that mean the same thing are equal."""

    r: int = 8  # rank of ΔW = A @ B: A (d_in, r), B (r, d_out)
    alpha: float = 16.0  # scaling s = α / r (α / √r with rslora); α is set once, not retuned per rank (§4.1)
    targets: tuple[str, ...] = ("q", "v")  # Linear layers of every block to adapt (the paper's default: q, v)
    dropout: float = 0.0  # dropout on the input of the low-rank path only (as loralib and peft)
    rslora: bool = False  # rank-stabilised scaling α / √r (Kalajdzievski 2023)
    zero: str = "B"  # which factor starts at zero so that ΔW = 0 at init: "B" (the paper, §4.1) or "A"
    seed: int = 0  # initialisation of the random factor (layer i uses seed + 7919·i) and of dropout masks
    modules_to_save: tuple[str, ...] = ()  # top-level modules trained fully (peft's modules_to_save)
    dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output column, LoRA adapts the direction
    init: str = "random"  # "random": one factor random, the other zero (`zero`); "pissa": W's top-r singular triplets

    def __post_init__(self) -> None:
        checks.fields(self, checks.positive_int, "r")
        checks.positive_number(self.alpha, "LoRAConfig.alpha", at_most=MAX_ALPHA)
        checks.fields(self, checks.probability, "dropout")
        checks.fields(self, checks.flag, "rslora")
        if self.zero not in ("A", "B"):
            hint = " (both zero: the gradients of A and B would both be 0, it could never learn)"
            hint = hint if self.zero == "both" else ""
            raise ValueError(f"LoRAConfig.zero must be 'B' (paper) or 'A', got {self.zero!r}{hint}")
        checks.fields(self, checks.nonnegative_int, "seed")
        checks.fields(self, checks.flag, "dora")
        checks.choice(self.init, "LoRAConfig.init", INITS)
        if self.init == "pissa" and self.zero != "B":  # two configs that mean the same must be equal
            raise ValueError(f"LoRAConfig.zero has no meaning with init='pissa' (neither factor starts at zero): "
                             f"leave it at 'B', got {self.zero!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        try:
            object.__setattr__(self, "targets", tuple(resolve_targets(self.targets)))
            object.__setattr__(self, "modules_to_save",
                               tuple(_resolve_names(self.modules_to_save, EXTRA_MODULES, "modules_to_save")))
        except ValueError as e:
            raise ValueError(f"LoRAConfig: {e}") from None

    @property
    def scaling(self) -> float:
        """s = α / r, or α / √r with rslora: keeps ΔW's size steady as r changes."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists for the tuples); ``LoRAConfig.from_dict`` reads it back."""
        return {**asdict(self), "targets": list(self.targets), "modules_to_save": list(self.modules_to_save)}

    @classmethod
    def from_dict(cls, d: Any) -> LoRAConfig:
        """A config from JSON (an adapter file's metadata): unknown or missing keys are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a LoRA config must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        d = {**ADDED_FIELDS, **d}  # a file written before these fields existed holds plain LoRA
        unknown, missing = sorted(set(d) - set(names)), sorted(set(names) - set(d))
        if unknown or missing:
            raise ValueError(f"LoRA config: unknown keys {unknown or 'none'}, missing keys {missing or 'none'}")
        return cls(**d)


class LoRALinear(Module):
    """A frozen Linear (W, b) plus a trainable low-rank update s·A·B.

    ``zero="B"`` (the paper's choice, §4.1): A ~ U(-1/√d_in, 1/√d_in) (Kaiming-uniform with a=√5, as loralib and
    peft), B = 0. ``zero="A"``: A = 0 and B ~ U(-1/√r, 1/√r). Either way ΔW = 0 at the start, so the adapted model
    begins exactly at the pretrained one. Zeroing both is refused: dL/dA = s·xᵀ g Bᵀ and dL/dB = s·(xA)ᵀ g are both
    zero when A = B = 0, so the update could never move.

    ``init="pissa"``: A, B from W's top-r singular triplets and W replaced (in place: it is the base's Parameter) by
    the residual W − s·A·B (``pissa_factors``); LoRA dropout, which acts on the adapter's input, then drops part of
    W's principal part in training mode (as in peft). ``dora=True``: a third trained parameter, ``magnitude`` (d_out,),
    and the layer runs ``dora_linear``. ``check_layer`` says whether W allows either, before anything changes.

    ``LoRALinear(base, LoRAConfig(r=4, alpha=8))`` or, as a convenience, ``LoRALinear(base, r=4, alpha=8)``
    (the keywords build the config). ``seed`` overrides ``config.seed`` for this layer (``apply_lora`` gives every
    layer its own). ``config.targets`` and ``modules_to_save`` concern whole models and are not used here.
    """

    def __init__(self, base: Linear, config: LoRAConfig | None = None, *, seed: int | None = None,
                 **kwargs: Any) -> None:
        config = _config(config, kwargs, "LoRALinear")
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a Linear, got {type(base).__name__}")
        checks.max_rank(config.r, min(base.d_in, base.d_out), "min(d_in, d_out)")
        check_layer(base, config)
        seed = config.seed if seed is None else replace(config, seed=seed).seed  # LoRAConfig checks the seed
        r = config.r
        self.d_in, self.d_out, self.config = base.d_in, base.d_out, config
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: names and W stay the base's
        self.weight.requires_grad = False  # frozen: backward computes no dW and the optimizer never sees W
        if self.bias is not None:
            self.bias.requires_grad = False
        gen, dtype = backend.rng(seed), base.weight.dtype
        if config.init == "pissa":  # W's principal part trains, the rest stays frozen (Meng et al. 2024)
            A, B, residual = pissa_factors(self.weight.data, r, config.scaling)
            self.A, self.B = Parameter(A), Parameter(B)
            self.weight.data[...] = residual  # W ← W − s·A·B: W + s·A·B is the base's W again (to rounding)
        elif config.zero == "B":  # B = 0 so ΔW = AB = 0 at init (Hu et al. §4.1)
            a_bound = 1.0 / math.sqrt(self.d_in)
            self.A = Parameter(backend.uniform(gen, (self.d_in, r), -a_bound, a_bound, dtype))
            self.B = Parameter(backend.xp.zeros((r, self.d_out), dtype=dtype))
        else:
            b_bound = 1.0 / math.sqrt(r)
            self.A = Parameter(backend.xp.zeros((self.d_in, r), dtype=dtype))
            self.B = Parameter(backend.uniform(gen, (r, self.d_out), -b_bound, b_bound, dtype))
        if config.dora:  # m = ‖W + s·A·B‖_col, computed as dora_linear computes it: m / ‖·‖ is exactly 1 at init
            self.magnitude = Parameter(column_norm(self.direction()))  # (d_out,)
        self.gen = backend.rng(seed + 1)
        self.merged = False
        self._unmerged_weight: Any = None  # DoRA: W as it was before merge(), which unmerge() puts back

    # read from the config, the one place they are stored
    r = property(lambda self: self.config.r)
    alpha = property(lambda self: self.config.alpha)
    rslora = property(lambda self: self.config.rslora)
    zero = property(lambda self: self.config.zero)
    scaling = property(lambda self: self.config.scaling)  # s = α / r (α / √r with rslora)
    dropout_p = property(lambda self: self.config.dropout)
    dora = property(lambda self: self.config.dora)

    def adapter_parameters(self) -> dict[str, Parameter]:
        """What the adapter trains and an adapter file holds: A and B, and DoRA's magnitude."""
        return {"A": self.A, "B": self.B, **({"magnitude": self.magnitude} if self.dora else {})}

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:  # W already holds W0 + s·A·B (DoRA: m ⊙ (W0 + s·A·B)/‖·‖): the adapter would count twice
            return F.linear(x, self.weight, self.bias)
        if self.dora:  # its own op: the column norm does not fold into fused_linear's one product
            return dora_linear(x, self.weight, self.bias, self.A, self.B, self.magnitude, self.scaling,
                               self.dropout_keep(x.shape))
        return fused_linear(x, [linear_part(self, x.shape)])  # lora_linear's y, by the fast op (fused.py)

    def dropout_keep(self, shape: tuple[int, ...]) -> Any:
        """LoRA's dropout mask (already divided by 1 - p) on the input of the low-rank path, as loralib and peft;
        None when it is off (eval mode or p = 0)."""
        if not (self.training and self.dropout_p > 0):
            return None
        keep = backend.to_device(self.gen.random(shape) >= self.dropout_p) / (1.0 - self.dropout_p)
        return keep.astype(self.weight.dtype)  # in W's dtype: a float32 model keeps a float32 mask

    def delta_weight(self) -> Any:
        """ΔW = s·A·B as an array (d_in, d_out). Under PiSSA this is W's principal part plus what training added to
        it, not the change from the base (that is s·A·B − s·A₀·B₀ with the initial factors); under DoRA the change
        of the direction only, before the rescaling by m."""
        return (self.A.data @ self.B.data) * self.scaling

    def direction(self) -> Any:
        """V = W + s·A·B (d_in, d_out), computed as ``dora_linear`` does (DoRA normalises its columns)."""
        return self.weight.data + self.scaling * engine.matmul(self.A.data, self.B.data)

    def merged_weight(self) -> Any:
        """The weight the layer computes with: W + s·A·B, or for DoRA m ⊙ V / ‖V‖_col with V = W + s·A·B."""
        if not self.dora:
            return self.weight.data + self.delta_weight().astype(self.weight.dtype)
        V = self.direction()
        return V * (self.magnitude.data / column_norm(V))  # (d_in, d_out) * (d_out,): column j scaled by m_j/‖V_j‖

    def merge(self) -> None:
        """W ← W + s·A·B (DoRA: W ← m ⊙ (W + s·A·B)/‖·‖_col). Inference then costs one matmul, as the base model.
        Merging twice is an error. While merged, forward does not use A and B, so they get no gradient: unmerge()
        before training again."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged (unmerge() first)")
        if self.dora:
            # W' = m ⊙ V/‖V‖ gives W back only through a division by m, which rounds (and fails where m_j = 0): keep
            # W itself (one more W while merged), so unmerge() restores it bit for bit and the base's fingerprint
            # (checkpoint.save_adapter) still matches. peft keeps ‖V‖ and divides instead.
            self._unmerged_weight = self.weight.data.copy()
            self.weight.data[...] = self.merged_weight()
        else:
            self.weight.data += self.delta_weight().astype(self.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W ← W - s·A·B, back to the pretrained W (up to float rounding; DoRA: exactly the W before merge()).
        Unmerging an unmerged layer is an error."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        if self.dora:
            self.weight.data[...] = self._unmerged_weight
            self._unmerged_weight = None
        else:
            self.weight.data -= self.delta_weight().astype(self.weight.dtype)
        self.merged = False

    def expected_lora_parameters(self) -> int:
        """r·(d_in + d_out): A has d_in·r numbers, B has r·d_out (2·d·r for a square W); DoRA adds d_out (m)."""
        return self.r * (self.d_in + self.d_out) + (self.d_out if self.dora else 0)

    def __repr__(self) -> str:
        variant = (", dora=True" if self.dora else "") + (f", init={self.config.init!r}"
                                                          if self.config.init != "random" else "")
        return (f"LoRALinear(d_in={self.d_in}, d_out={self.d_out}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}{variant}, merged={self.merged})")


def column_norm(V: Any) -> Any:
    """‖V‖ per output column: sqrt(Σ_i V_ij²) over d_in. (d_in, d_out) -> (d_out,). DoRA's norm; with y = x @ W a
    column of W holds the weights of one output unit (the paper's ‖·‖_c over the rows of its (d_out, d_in) W)."""
    return backend.xp.sqrt((V * V).sum(axis=0))


def pissa_factors(W: Any, r: int, s: float) -> tuple[Any, Any, Any]:
    """PiSSA's start (Meng et al. 2024): A, B from W's top-r singular triplets, and the residual -> (A, B, W − s·A·B).

    W = U diag(S) Vᵀ (float64, on the host); A = U_r √(S_r/s) (d_in, r), B = √(S_r/s) V_rᵀ (r, d_out), so that
    s·A·B = U_r S_r V_rᵀ, W's best rank-r approximation, whatever α and r make s (peft divides S_r by s the same
    way). The residual is computed from A and B as stored (rounded to W's dtype), so W_res + s·A·B gives W back to
    the rounding of the last step. The signs of singular vectors are arbitrary (LAPACK's choice); the residual is
    not: u_i σ_i v_iᵀ is the same with both flipped."""
    np, dtype = backend.np, W.dtype
    W64 = backend.to_numpy(W).astype(np.float64)
    U, S, Vt = np.linalg.svd(W64, full_matrices=False)  # U (d_in, k), S (k,) descending, Vt (k, d_out)
    root = np.sqrt(S[:r] / s)  # (r,): √(S_r / s)
    A = (U[:, :r] * root).astype(dtype)  # (d_in, r) * (r,) -> (d_in, r)
    B = (root[:, None] * Vt[:r]).astype(dtype)  # (r, 1) * (r, d_out) -> (r, d_out)
    residual = W64 - s * (A.astype(np.float64) @ B.astype(np.float64))  # (d_in, d_out)
    return backend.to_device(A), backend.to_device(B), backend.to_device(residual.astype(dtype))


def numerical_rank(W: Any) -> int:
    """The number of singular values of W above numpy's matrix_rank tolerance, σ_max · max(d_in, d_out) · ε of W's
    dtype: below it a singular value is rounding, not a direction of W."""
    np = backend.np
    S = np.linalg.svd(backend.to_numpy(W).astype(np.float64), compute_uv=False)
    tol = (S.max() if S.size else 0.0) * max(W.shape) * np.finfo(W.dtype).eps
    return int((S > tol).sum())


def check_layer(layer: Linear, config: LoRAConfig, name: str = "the layer") -> None:
    """What DoRA and PiSSA need of a layer's W, checked before anything changes (``apply_lora`` checks every target
    first, ``LoRALinear`` its own): a ValueError naming the layer otherwise.

    * DoRA divides each output column of W + s·A·B by its norm: a column of norm 0 (all zero) has no direction to
      normalise (0/0), so every column of W must have a norm > 0.
    * PiSSA takes W's top-r singular triplets: past rank(W) they are zero vectors, so that column of A and row of B
      would both start at 0 and, like LoRA with A = B = 0, never receive a gradient. r must be at most rank(W)."""
    W = layer.weight.data
    if config.dora:
        norms = backend.to_numpy(column_norm(W))
        bad = backend.np.flatnonzero(~(norms > 0))  # NaN counts as bad too
        if bad.size or W.shape[0] == 0:
            raise ValueError(f"DoRA divides each output column of W by its norm, but {name}'s W {tuple(W.shape)} has "
                             f"{bad.size} column(s) of norm 0 (columns {bad[:8].tolist()}): no direction to "
                             "normalise")
    if config.init == "pissa":
        rank = numerical_rank(W)
        if config.r > rank:
            raise ValueError(f"PiSSA needs r <= rank(W): {name}'s W {tuple(W.shape)} has rank {rank}, r = "
                             f"{config.r}; its singular directions past the rank are zero, and A's and B's parts "
                             "for them would start at 0 and never train")


def lora_linear(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float, keep: Any = None) -> Tensor:
    """y = x @ W + b + s · ((x ⊙ keep) @ A) @ B: one LoRA layer as one op, its backward a few lines below.

    Shapes: x (..., d_in), W (d_in, d_out), b (d_out,) or None, A (d_in, r), B (r, d_out) -> y (..., d_out).
    ``keep``: LoRA's dropout mask on the input of the low-rank path (already divided by 1 - p), or None. The graph
    keeps x and h (and x ⊙ keep). This is the op to read; the model runs the same computation, faster, as
    ``fused.fused_linear`` (tests/test_fused.py checks that the two agree on the values and every gradient).
    """
    mm = engine.matmul
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (..., k) -> (N, k), a view
    xk = x.data if keep is None else x.data * keep  # (..., d_in): what the adapter reads
    h = mm(xk, A.data)  # (..., d_in) @ (d_in, r) -> (..., r), thin
    y = mm(x.data, W.data) + s * mm(h, B.data)  # (..., d_in) @ (d_in, d_out) + s·(..., r) @ (r, d_out)
    if b is not None:
        y += b.data
    parents = (x, W, A, B) if b is None else (x, W, A, B, b)

    def backward(g):  # g = dL/dy (..., d_out); every gradient only for an input that requires it
        dh = s * mm(g, B.data.T)  # dL/dh = s·g Bᵀ: (..., d_out) @ (d_out, r) -> (..., r)
        dx = None
        if x.requires_grad:  # x reaches y twice: through W, and through A where dropout kept it
            through_A = mm(dh, A.data.T)  # (..., r) @ (r, d_in) -> (..., d_in)
            dx = mm(g, W.data.T) + (through_A if keep is None else through_A * keep)
        dW = mm(rows(x.data).T, rows(g)) if W.requires_grad else None  # xᵀ g; LoRA freezes W: no product
        dA = mm(rows(xk).T, rows(dh)) if A.requires_grad else None  # (x ⊙ keep)ᵀ dh: (d_in, N) @ (N, r)
        dB = s * mm(rows(h).T, rows(g)) if B.requires_grad else None  # s·hᵀ g: (r, N) @ (N, d_out)
        db = rows(g).sum(axis=0) if b is not None and b.requires_grad else None  # Σ g over the rows
        return (dx, dW, dA, dB, db)[: len(parents)]

    return Tensor.from_op(y, parents, "lora_linear", backward)


def dora_linear(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, m: Tensor, s: float,
                keep: Any = None) -> Tensor:
    """y = (x @ V) ⊙ m / ‖V‖_col + b with V = W + s·A·B: one DoRA layer (Liu et al. 2024) as one op, its backward
    a few lines below. With dropout the adapter reads x ⊙ keep, as in lora_linear (and peft): x @ V becomes
    x @ W + s·((x ⊙ keep) @ A) @ B, and the rescaling applies to both.

    Shapes: x (..., d_in), W (d_in, d_out), b (d_out,) or None, A (d_in, r), B (r, d_out), m (d_out,) -> y (..., d_out).

    The gradient is exact: ‖V‖ depends on A and B, and backward follows that dependence. DoRA §4.3 (and peft, always)
    treats the norm as a constant instead, to save the memory of its graph in PyTorch; that drops the ``dV`` term
    below and trains on a slightly different gradient. Here the norm costs no graph (V is kept either way, for dx),
    and a gradient that gradcheck can verify is the one to read first. The graph keeps x, h, z and V.
    """
    mm = engine.matmul
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (..., k) -> (N, k), a view
    V = W.data + s * mm(A.data, B.data)  # (d_in, r) @ (r, d_out) -> (d_in, d_out): the adapted direction
    n = column_norm(V)  # (d_out,): ‖V‖ over d_in, one per output column
    c = m.data / n  # (d_out,): each output column is rescaled to length m
    xk = x.data if keep is None else x.data * keep  # (..., d_in): what the adapter reads
    h = mm(xk, A.data)  # (..., d_in) @ (d_in, r) -> (..., r)
    z = mm(x.data, W.data) + s * mm(h, B.data)  # (..., d_out): x @ V (the adapter's part on x ⊙ keep)
    y = z * c  # (..., d_out) * (d_out,)
    if b is not None:
        y += b.data  # the bias is not rescaled (as peft)
    parents = (x, W, A, B, m) if b is None else (x, W, A, B, m, b)

    def backward(g):  # g = dL/dy (..., d_out)
        dc = rows(g * z).sum(axis=0)  # dL/dc = Σ_rows g ⊙ z (d_out,)
        dn = -dc * c / n  # c = m / n: dc/dn = -m/n² = -c/n (d_out,)
        dV = V * (dn / n)  # through the norm: ∂n_j/∂V_ij = V_ij / n_j -> (d_in, d_out)
        gz = g * c  # dL/dz = g ⊙ c (..., d_out)
        dh = s * mm(gz, B.data.T)  # (..., d_out) @ (d_out, r) -> (..., r)
        dx = None
        if x.requires_grad:  # through W, and through A where dropout kept it (V's norm does not depend on x)
            through_A = mm(dh, A.data.T)  # (..., r) @ (r, d_in) -> (..., d_in)
            dx = mm(gz, W.data.T) + (through_A if keep is None else through_A * keep)
        dW = mm(rows(x.data).T, rows(gz)) + dV if W.requires_grad else None  # xᵀ gz (d_in, d_out), + the norm's
        dA = mm(rows(xk).T, rows(dh)) + s * mm(dV, B.data.T) if A.requires_grad else None  # (d_in, r) each
        dB = s * (mm(rows(h).T, rows(gz)) + mm(A.data.T, dV)) if B.requires_grad else None  # (r, d_out) each
        dm = dc / n if m.requires_grad else None  # dc/dm = 1/n (d_out,)
        db = rows(g).sum(axis=0) if b is not None and b.requires_grad else None
        return (dx, dW, dA, dB, dm, db)[: len(parents)]

    return Tensor.from_op(y, parents, "dora_linear", backward)


def linear_part(layer: Module, x_shape: tuple[int, ...]) -> LinearPart:
    """A Linear or LoRALinear as a ``fused.LinearPart`` (a merged LoRALinear is a plain Linear: W holds W0 + s·A·B).
    keep: LoRA's dropout mask on the input of the low-rank path (already divided by 1 - p), drawn here. An unmerged
    DoRA layer is not a LinearPart (its columns are rescaled by m/‖V‖): it runs ``dora_linear``."""
    if not isinstance(layer, LoRALinear) or layer.merged:
        return LinearPart(layer.weight, layer.bias)
    if layer.dora:
        raise ValueError("linear_part: an unmerged DoRA layer is not a fused.LinearPart; it runs dora_linear")
    return LinearPart(layer.weight, layer.bias, layer.A, layer.B, layer.scaling, layer.dropout_keep(x_shape))


def shared_input_linear(x: Tensor, layers: Sequence[Module]) -> Tensor:
    """[layer(x) for layer in layers] (Linear or LoRALinear) concatenated on the last axis, as one op.

    The attention's q, k and v read the same x; the model keeps them as three modules (Hu et al. adapt them one
    by one) and computes them here together: ``fused.fused_linear`` of their parts. A layer with no fused part
    (an unmerged DoRA layer: DoRA's own op; one adapter per sample: multi_adapter.py) makes each layer run its own
    forward, and the outputs are joined: those are not on the fast path."""
    if any(not isinstance(m, (Linear, LoRALinear)) or (isinstance(m, LoRALinear) and m.dora and not m.merged)
           for m in layers):
        return engine.concat([m(x) for m in layers], axis=-1)  # [(..., d_1), ...] -> (..., Σ d_i)
    return fused_linear(x, [linear_part(m, x.shape) for m in layers])


def _resolve_names(names: str | Iterable[str], valid: tuple[str, ...], what: str, also: str = "") -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> a checked list of names from ``valid``, in ``valid``'s order (``also``: other
    accepted spellings, for the error message)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, Iterable):
        raise ValueError(f"{what} must be a comma list or a list of names, got {names!r}")
    names = list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {list(valid)}{also}")
    return [n for n in valid if n in names]


def resolve_targets(targets: str | Iterable[str]) -> list[str]:
    """``"all-linear"``, ``"q,v"`` or ``["q", "v"]`` -> a checked list of target names (in TARGETS order)."""
    names = _resolve_names(TARGETS if targets == "all-linear" else targets, TARGETS, "LoRA target(s)",
                           " or 'all-linear'")
    if not names:
        raise ValueError(f"unknown LoRA target(s) (none given); valid: {list(TARGETS)} or 'all-linear'")
    return names


def _config(config: LoRAConfig | None, kwargs: dict[str, Any], where: str) -> LoRAConfig:
    """``config``, or one built from keyword arguments (the convenience form); never both."""
    if config is not None and kwargs:
        raise TypeError(f"{where}: give a LoRAConfig or keyword arguments, not both (got {sorted(kwargs)})")
    if config is None:
        try:
            return LoRAConfig(**kwargs)
        except TypeError as e:  # an unknown keyword
            raise TypeError(f"{where}: {e}; LoRAConfig fields: {[f.name for f in fields(LoRAConfig)]}") from None
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"{where}: expected a LoRAConfig, got {type(config).__name__} (targets go in the config: "
                        f"LoRAConfig(targets=...))")
    return config


def target_layers(model: Module, targets: Sequence[str]) -> list[tuple[str, Module, str, Module]]:
    """(full name, parent module, attribute, layer) for every target layer, in model order."""
    found = []
    for mod_name, module in model.named_modules():
        for attr in targets:
            layer = vars(module).get(attr)
            if isinstance(layer, (Linear, LoRALinear)):
                found.append((f"{mod_name}.{attr}" if mod_name else attr, module, attr, layer))
    return found


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every adapted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameter_ids(model: Module) -> set[int]:
    """ids of every adapter parameter (A and B, DoRA's magnitude) in ``model``: what a base-model checkpoint leaves
    out."""
    return {id(p) for m in lora_layers(model).values() for p in m.adapter_parameters().values()}


def base_fingerprint(model: Module, skip_modules: Iterable[str] = ()) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the base model's parameters as they are now: not A and
    B, and not the parameters of ``skip_modules`` (the modules_to_save an adapter carries itself). An adapter
    records it when it is saved, so that loading it into a different base model is caught."""
    skip = adapter_parameter_ids(model) | {id(p) for m in skip_modules for p in vars(model)[m].parameters()}
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if id(p) not in skip:
            arr = backend.to_numpy(p.data)
            h.update(f"{name}{arr.shape}{arr.dtype}".encode())
            h.update(backend.np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def check_lora(model: Module, config: LoRAConfig) -> list[tuple[str, Module, str, Module]]:
    """Every check ``apply_lora(model, config)`` needs, changing nothing: the model has no LoRA yet, has the
    target layers and the modules_to_save, r fits every target, and every target's W allows DoRA and PiSSA
    (``check_layer``). Returns the target layers."""
    if lora_layers(model):
        raise RuntimeError("apply_lora: the model already has LoRA layers (build a fresh model to change the setup)")
    missing = [m for m in config.modules_to_save if not isinstance(vars(model).get(m), Module)]
    if missing:
        raise ValueError(f"apply_lora: modules_to_save {missing} are not modules of {type(model).__name__}")
    layers = target_layers(model, config.targets)
    if not layers:
        raise ValueError(f"apply_lora: no Linear layer named {list(config.targets)} in {type(model).__name__}")
    max_r = min(min(layer.d_in, layer.d_out) for *_, layer in layers)
    checks.max_rank(config.r, max_r, f"min(d_in, d_out) of the targets {list(config.targets)}")
    for name, *_, layer in layers:  # DoRA's column norms, PiSSA's rank
        check_layer(layer, config, name)
    return layers


def apply_lora(model: Module, config: LoRAConfig | None = None, **kwargs: Any) -> Module:
    """Replace the target Linear layers of every block by LoRALinear and freeze everything else.

    ``apply_lora(model, LoRAConfig(r=8, alpha=16, targets="q,v"))``, or as a convenience
    ``apply_lora(model, r=8, alpha=16, targets="q,v")`` (the keywords build the config). Afterwards
    ``model.trainable_parameters()`` is exactly the A and B of each adapted layer (plus the parameters of
    ``config.modules_to_save``, e.g. ``("wte", "lm_head")``, for a fine-tuning corpus with characters the base
    model never saw) and ``model.lora_config`` is the config. The model is changed in place and returned; every
    check happens before the first change, so an error leaves the model exactly as it was.

    With ``init="pissa"`` the W of every target is replaced by its residual, so the frozen weights in the model are
    no longer the base's: the base's fingerprint is taken first and kept (``adapter_fingerprint``).
    """
    config = _config(config, kwargs, "apply_lora")
    layers = check_lora(model, config)
    base_print = base_fingerprint(model, config.modules_to_save) if config.init == "pissa" else None
    for p in model.parameters():
        p.requires_grad = False
    for i, (_, parent, attr, layer) in enumerate(layers):
        setattr(parent, attr, LoRALinear(layer, config, seed=config.seed + 7919 * i))  # own stream per layer
    for m in config.modules_to_save:
        for p in vars(model)[m].parameters():
            p.requires_grad = True
    model.lora_config = config
    if base_print is not None:  # (the base as it was, the residual model as it is now)
        model.pissa_fingerprints = (base_print, base_fingerprint(model, config.modules_to_save))
    return model


def adapter_fingerprint(model: Module) -> str:
    """The fingerprint of the base an adapter of ``model`` belongs to, which ``checkpoint.save_adapter`` records and
    ``load_adapter`` compares: ``base_fingerprint`` of the frozen weights as they are now; for PiSSA that of the
    base before ``apply_lora`` replaced its W by the residuals, since the residuals are not a model anyone has. A
    PiSSA adapter is then loaded as it was made: onto that base, by apply_lora (the SVD again), then its A and B.

    (peft instead converts a PiSSA adapter to a plain LoRA one of rank 2r on the original W, [A | A₀] and
    [B; -B₀], keeping the initial factors for it. Ours stays rank r and names its base; the price is an SVD
    on loading, which on another machine may round the residual differently in the last bits.)"""
    config: LoRAConfig = model.lora_config
    now = base_fingerprint(model, config.modules_to_save)
    if config.init != "pissa":
        return now
    base_print, residual_print = model.pissa_fingerprints
    if now != residual_print:
        raise RuntimeError("a frozen weight changed after PiSSA was applied: the base this adapter belongs to is "
                           "no longer known (its W were replaced by residuals); apply PiSSA to the changed base")
    return base_print


def prepare_finetuning(model: Module, lora: LoRAConfig | None, train_only: str | Iterable[str] = ()) -> Module:
    """Set ``model`` up for fine-tuning, in place. The one set-up the experiments and the memory ledger share:

    * LoRA (``lora`` given): ``apply_lora``;
    * full fine-tuning (``lora=None``): every parameter trainable;
    * full fine-tuning of some weights only (``lora=None, train_only="q,v"``): the weight and bias of those
      Linear layers of every block train, every other parameter is frozen. The control run that separates rank
      from placement: LoRA on q, v at rank r against q, v themselves with no rank limit.

    ``train_only`` takes the names LoRA targets take (``"q,v"``, a list, ``"all-linear"``); it is checked before
    anything changes, and giving it together with ``lora`` is a ValueError."""
    only = check_setup(lora, train_only, "prepare_finetuning")
    if lora is not None:
        return apply_lora(model, lora)
    if lora_layers(model):
        raise RuntimeError("prepare_finetuning: full fine-tuning of a model with LoRA layers (use the base model)")
    layers = target_layers(model, only) if only else []
    if only and not layers:
        raise ValueError(f"prepare_finetuning: no Linear layer named {list(only)} in {type(model).__name__}")
    trained = {id(p) for *_, layer in layers for p in layer.parameters()}
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad = not only or id(p) in trained
    except Exception:  # a weight that cannot train (a 4-bit one, qlora.py): put every flag back, then say why
        for p, flag in before:
            p.requires_grad = flag
        raise
    return model


def check_setup(lora: LoRAConfig | None, train_only: str | Iterable[str], where: str,
                wrong_type: type[Exception] = TypeError) -> tuple[str, ...]:
    """Check a fine-tuning setup as ``prepare_finetuning`` takes it (a LoRAConfig or None, and ``train_only`` only
    without LoRA) -> ``train_only`` resolved. ``wrong_type``: the error for a ``lora`` that is not a LoRAConfig
    (configs raise ValueError, functions TypeError)."""
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise wrong_type(f"{where}: lora must be a LoRAConfig or None (full fine-tuning), got {lora!r}")
    only = resolve_train_only(train_only)
    if lora is not None and only:
        raise ValueError(f"{where}: give lora (LoRA) or train_only (full fine-tuning of some weights), not both")
    return only


def resolve_train_only(train_only: str | Iterable[str]) -> tuple[str, ...]:
    """``train_only`` of ``prepare_finetuning`` -> a checked tuple of TARGETS names; ``()`` or ``""`` for none."""
    if isinstance(train_only, str) and not train_only.strip() or (
            isinstance(train_only, (list, tuple)) and not train_only):
        return ()
    try:
        return tuple(resolve_targets(train_only))
    except ValueError as e:
        raise ValueError(f"train_only: {e}") from None


def finetuning_mode(lora: LoRAConfig | None, train_only: Sequence[str] = ()) -> str:
    """The name of a ``prepare_finetuning`` setup, as results and ledgers record it: "lora", "full" (every weight)
    or "partial" (full fine-tuning of the ``train_only`` layers)."""
    return "lora" if lora is not None else "partial" if train_only else "full"


def merge(model: Module) -> None:
    """Merge every LoRA layer (W ← W + s·A·B). All must be unmerged; none is touched otherwise."""
    layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise RuntimeError(f"merge: already merged: {[n for n, m in layers.items() if m.merged]}")
    for m in layers.values():
        m.merge()


def unmerge(model: Module) -> None:
    """Undo ``merge`` on every LoRA layer. All must be merged; none is touched otherwise."""
    layers = lora_layers(model)
    if not all(m.merged for m in layers.values()):
        raise RuntimeError(f"unmerge: not merged: {[n for n, m in layers.items() if not m.merged]}")
    for m in layers.values():
        m.unmerge()


# -- parameter counts --------------------------------------------------------------------------------------------


@dataclass
class ParameterCount:
    rows: list[tuple[str, int, int]]  # (module name, trainable, frozen) for every module owning parameters
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def report(self) -> str:
        """A printable table: one line per module with parameters, then the totals."""
        w = max([len(n) for n, *_ in self.rows] + [6])
        lines = [f"{'module':<{w}}  {'trainable':>12}  {'frozen':>12}"]
        lines += [f"{n:<{w}}  {t:>12,}  {f:>12,}" for n, t, f in self.rows]
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{'total':<{w}}  {self.trainable:>12,}  {self.frozen:>12,}")
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({share:.3f}%)")
        return "\n".join(lines)


def count_parameters(model: Module) -> ParameterCount:
    """Trainable / frozen parameter counts per module and in all. Every LoRA layer's count is checked against
    r·(d_in + d_out): if A and B do not hold exactly that many numbers, something is wrong and this says so."""
    rows, trainable, frozen = [], 0, 0
    for name, module in model.named_modules():
        own = [v for v in vars(module).values() if isinstance(v, Parameter)]
        if not own:
            continue
        t = sum(p.size for p in own if p.requires_grad)
        f = sum(p.size for p in own if not p.requires_grad)
        held = sum(p.size for p in module.adapter_parameters().values()) if isinstance(module, LoRALinear) else 0
        if isinstance(module, LoRALinear) and held != module.expected_lora_parameters():
            raise AssertionError(f"{name}: the adapter holds {held} numbers, expected r·(d_in + d_out)"
                                 f"{' + d_out' if module.dora else ''} = {module.expected_lora_parameters()}")
        rows.append((name or type(model).__name__, t, f))
        trainable, frozen = trainable + t, frozen + f
    return ParameterCount(rows, trainable, frozen)
