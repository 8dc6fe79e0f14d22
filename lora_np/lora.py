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
``modules_to_save`` = ``modules_to_save``; ``zero`` and ``seed`` have no peft field (peft always zeroes B).

Merging is explicit: ``merge()`` folds s·A·B into W so inference costs exactly what the base model costs, and
``unmerge()`` takes it out again. ``eval()`` never merges. Which parameters train is decided by structure: a
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
        seed = config.seed if seed is None else replace(config, seed=seed).seed  # LoRAConfig checks the seed
        r = config.r
        self.d_in, self.d_out, self.config = base.d_in, base.d_out, config
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: names and W stay the base's
        self.weight.requires_grad = False  # frozen: backward computes no dW and the optimizer never sees W
        if self.bias is not None:
            self.bias.requires_grad = False
        gen, dtype = backend.rng(seed), base.weight.dtype
        if config.zero == "B":  # B = 0 so ΔW = AB = 0 at init (Hu et al. §4.1)
            a_bound = 1.0 / math.sqrt(self.d_in)
            self.A = Parameter(backend.uniform(gen, (self.d_in, r), -a_bound, a_bound, dtype))
            self.B = Parameter(backend.xp.zeros((r, self.d_out), dtype=dtype))
        else:
            b_bound = 1.0 / math.sqrt(r)
            self.A = Parameter(backend.xp.zeros((self.d_in, r), dtype=dtype))
            self.B = Parameter(backend.uniform(gen, (r, self.d_out), -b_bound, b_bound, dtype))
        self.gen = backend.rng(seed + 1)
        self.merged = False

    # read from the config, the one place they are stored
    r = property(lambda self: self.config.r)
    alpha = property(lambda self: self.config.alpha)
    rslora = property(lambda self: self.config.rslora)
    zero = property(lambda self: self.config.zero)
    scaling = property(lambda self: self.config.scaling)  # s = α / r (α / √r with rslora)
    dropout_p = property(lambda self: self.config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:  # W already holds W0 + s·A·B: the low-rank path would count twice
            return F.linear(x, self.weight, self.bias)
        return fused_linear(x, [linear_part(self, x.shape)])  # lora_linear's y, by the fast op (fused.py)

    def dropout_keep(self, shape: tuple[int, ...]) -> Any:
        """LoRA's dropout mask (already divided by 1 - p) on the input of the low-rank path, as loralib and peft;
        None when it is off (eval mode or p = 0)."""
        if not (self.training and self.dropout_p > 0):
            return None
        keep = backend.to_device(self.gen.random(shape) >= self.dropout_p) / (1.0 - self.dropout_p)
        return keep.astype(self.weight.dtype)  # in W's dtype: a float32 model keeps a float32 mask

    def delta_weight(self) -> Any:
        """ΔW = s·A·B as an array (d_in, d_out)."""
        return (self.A.data @ self.B.data) * self.scaling

    def merge(self) -> None:
        """W ← W + s·A·B. Inference then costs one matmul, as the base model. Merging twice is an error.
        While merged, forward does not use A and B, so they get no gradient: unmerge() before training again."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged (unmerge() first)")
        self.weight.data += self.delta_weight().astype(self.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W ← W - s·A·B, back to the pretrained W (up to float rounding). Unmerging an unmerged layer is an error."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        self.weight.data -= self.delta_weight().astype(self.weight.dtype)
        self.merged = False

    def expected_lora_parameters(self) -> int:
        """r·(d_in + d_out): A has d_in·r numbers, B has r·d_out (2·d·r for a square W)."""
        return self.r * (self.d_in + self.d_out)

    def __repr__(self) -> str:
        return (f"LoRALinear(d_in={self.d_in}, d_out={self.d_out}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, merged={self.merged})")


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


def linear_part(layer: Module, x_shape: tuple[int, ...]) -> LinearPart:
    """A Linear or LoRALinear as a ``fused.LinearPart`` (a merged LoRALinear is a plain Linear: W holds W0 + s·A·B).
    keep: LoRA's dropout mask on the input of the low-rank path (already divided by 1 - p), drawn here."""
    if not isinstance(layer, LoRALinear) or layer.merged:
        return LinearPart(layer.weight, layer.bias)
    return LinearPart(layer.weight, layer.bias, layer.A, layer.B, layer.scaling, layer.dropout_keep(x_shape))


def shared_input_linear(x: Tensor, layers: Sequence[Module]) -> Tensor:
    """[layer(x) for layer in layers] (Linear or LoRALinear) concatenated on the last axis, as one op.

    The attention's q, k and v read the same x; the model keeps them as three modules (Hu et al. adapt them one
    by one) and computes them here together: ``fused.fused_linear`` of their parts."""
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
    """ids of every LoRA factor (A and B) in ``model``: what a base-model checkpoint leaves out."""
    return {id(p) for m in lora_layers(model).values() for p in (m.A, m.B)}


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
    target layers and the modules_to_save, and r fits every target. Returns the target layers."""
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
    return layers


def apply_lora(model: Module, config: LoRAConfig | None = None, **kwargs: Any) -> Module:
    """Replace the target Linear layers of every block by LoRALinear and freeze everything else.

    ``apply_lora(model, LoRAConfig(r=8, alpha=16, targets="q,v"))``, or as a convenience
    ``apply_lora(model, r=8, alpha=16, targets="q,v")`` (the keywords build the config). Afterwards
    ``model.trainable_parameters()`` is exactly the A and B of each adapted layer (plus the parameters of
    ``config.modules_to_save``, e.g. ``("wte", "lm_head")``, for a fine-tuning corpus with characters the base
    model never saw) and ``model.lora_config`` is the config. The model is changed in place and returned; every
    check happens before the first change, so an error leaves the model exactly as it was.
    """
    config = _config(config, kwargs, "apply_lora")
    layers = check_lora(model, config)
    for p in model.parameters():
        p.requires_grad = False
    for i, (_, parent, attr, layer) in enumerate(layers):
        setattr(parent, attr, LoRALinear(layer, config, seed=config.seed + 7919 * i))  # own stream per layer
    for m in config.modules_to_save:
        for p in vars(model)[m].parameters():
            p.requires_grad = True
    model.lora_config = config
    return model


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
    for p in model.parameters():
        p.requires_grad = not only or id(p) in trained
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
        if isinstance(module, LoRALinear) and module.A.size + module.B.size != module.expected_lora_parameters():
            raise AssertionError(f"{name}: A and B hold {module.A.size + module.B.size} numbers, "
                                 f"expected r·(d_in + d_out) = {module.expected_lora_parameters()}")
        rows.append((name or type(model).__name__, t, f))
        trainable, frozen = trainable + t, frozen + f
    return ParameterCount(rows, trainable, frozen)
