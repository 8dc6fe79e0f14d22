"""Many adapters, one batch: each sample of a batch runs through the one base model with its own LoRA adapter.

Merging (W ← W + s·A·B) makes an adapter free at inference, but then the model serves one task: Hu et al. §4.2 note
that inputs for different tasks cannot share a batch. Keeping the adapters unmerged lifts that: the base product
x @ W is the same for every sample, and only the thin low-rank path differs (S-LoRA, Sheng et al. 2023; Punica,
Chen et al. 2023). With k(i) the adapter that sample i names,

    y_i = x_i @ W + b + s_k(i) · (x_i @ A_k(i)) @ B_k(i)

Each adapted layer holds its K adapters as stacks, A (K, d_in, r) and B (K, r, d_out) (a rank below r is padded
with zeros, which leaves its A·B unchanged). A batch gathers one A and one B per sample, A[ids] (n, d_in, r), and
multiplies them in one batched product: no Python loop over the samples (``multi_lora_linear``, backward below).

    adapters = [Adapter.of(m) for m in trained_lora_models]    # or Adapter.load(base, "task.safetensors")
    apply_adapters(base, adapters)                             # the adapted Linears now hold the K adapters
    with use_adapters(base, ids):                              # ids[i]: the adapter of sample i, in 0..K-1
        logits, _ = base(idx)                                  # idx (n, T): one batch, n different tasks
        out = base.generate(prompts, 50)                       # one prompt per adapter, generated together

The K adapters cost K·r·(d_in + d_out) numbers a layer; K merged models cost K full copies of the model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import backend, engine
from .engine import Tensor
from .lora import TARGETS, lora_layers, target_layers
from .nn import Linear, Module, Parameter


@dataclass(frozen=True, eq=False)
class Adapter:
    """One trained LoRA adapter, as a mixed batch takes it: its factors per layer and its scaling s."""

    factors: dict[str, tuple[Any, Any]]  # layer name ("blocks.0.attn.q") -> (A (d_in, r), B (r, d_out))
    scaling: float  # s = α / r (or α / √r): the adapter's own, so adapters of different r and α can share a batch

    @classmethod
    def of(cls, model: Module) -> Adapter:
        """The adapter of a model with LoRA (unmerged): copies of its A and B, and its scaling."""
        layers = lora_layers(model)
        if not layers:
            raise ValueError("Adapter.of: the model has no LoRA layers")
        if any(m.merged for m in layers.values()):
            raise RuntimeError("Adapter.of: unmerge() first (a merged layer's A·B is inside W)")
        if model.lora_config.modules_to_save:  # a whole module per adapter is not a low-rank path a batch can share
            raise ValueError(f"Adapter.of: the adapter also trains {list(model.lora_config.modules_to_save)}; a "
                             f"mixed batch shares everything but A and B")
        return cls({n: (m.A.data.copy(), m.B.data.copy()) for n, m in layers.items()}, model.lora_config.scaling)

    @classmethod
    def load(cls, model: Module, path: str | os.PathLike) -> Adapter:
        """An adapter file for the base ``model``, with every check of ``load_adapter`` (its config, the base's
        fingerprint, every tensor), nothing loaded into the model."""
        from .checkpoint import check_adapter  # here: checkpoint imports the model, which imports lora

        tensors, config = check_adapter(model, path, fingerprint=True)
        if config.modules_to_save:
            raise ValueError(f"Adapter.load: {path} also trains {list(config.modules_to_save)}; a mixed batch "
                             f"shares everything but A and B")
        names = {k.rsplit(".", 1)[0] for k in tensors}
        return cls({n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in sorted(names)}, config.scaling)


class MultiLoRALinear(Module):
    """A frozen Linear (W, b) and K frozen adapters, stacked: A (K, d_in, r), B (K, r, d_out), scalings (K,).
    ``forward`` runs sample i with adapter ``ids[i]``; ``ids`` is set by ``use_adapters`` for one block of code."""

    def __init__(self, base: Linear, A: Any, B: Any, scalings: Any) -> None:
        self.d_in, self.d_out = base.d_in, base.d_out
        self.weight, self.bias = base.weight, base.bias  # the same objects: a 4-bit W (qlora.py) stays 4-bit
        self.A = Parameter(A, requires_grad=False)  # (K, d_in, r): adapter k's A is A[k]
        self.B = Parameter(B, requires_grad=False)  # (K, r, d_out)
        self.scalings = scalings  # (K,) array: s of each adapter
        self.ids: Any = None  # (n,) adapter of each sample, only inside use_adapters

    n_adapters = property(lambda self: self.A.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.ids is None:  # no silent default: a forgotten choice would serve every sample the base model
            raise RuntimeError("MultiLoRALinear: no adapter chosen; run the model inside use_adapters(model, ids)")
        return multi_lora_linear(x, self.weight, self.bias, self.A, self.B, self.scalings, self.ids)

    def __repr__(self) -> str:
        return f"MultiLoRALinear(d_in={self.d_in}, d_out={self.d_out}, adapters={self.n_adapters}, r={self.A.shape[2]})"


def multi_lora_linear(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Any, ids: Any) -> Tensor:
    """y_i = x_i @ W + b + s_k·(x_i @ A_k) @ B_k with k = ids[i], for every sample i of the batch, as one op.

    Shapes: x (n, ..., d_in), W (d_in, d_out), b (d_out,), A (K, d_in, r), B (K, r, d_out), s (K,) and ids (n,)
    arrays -> y (n, ..., d_out). The gather A[ids] makes one (d_in, r) matrix per sample, so that the low-rank
    path is one batched product; the base product is shared, as in a plain Linear.
    """
    xp, mm = backend.xp, engine.matmul
    n, d_in, d_out = x.shape[0], x.shape[-1], W.shape[1]
    if tuple(ids.shape) != (n,):
        raise ValueError(f"multi_lora_linear: {tuple(ids.shape)} adapter ids for a batch of {n} samples")
    x3 = x.data.reshape(n, -1, d_in)  # (n, L, d_in): the L positions of each sample
    Ak, Bk = A.data[ids], B.data[ids]  # gather: (K, d_in, r)[ids] -> (n, d_in, r); (K, r, d_out)[ids] -> (n, r, d_out)
    sk = s[ids].reshape(n, 1, 1).astype(x3.dtype)  # (n, 1, 1): each sample's scaling
    h = mm(x3, Ak)  # (n, L, d_in) @ (n, d_in, r) -> (n, L, r): every sample through its own A, one product
    y = mm(x3, W.data)  # (n, L, d_in) @ (d_in, d_out) -> (n, L, d_out): the base, shared by all samples
    y += sk * mm(h, Bk)  # (n, L, r) @ (n, r, d_out) -> (n, L, d_out), times s_k
    if b is not None:
        y += b.data
    parents = (x, W, A, B) if b is None else (x, W, A, B, b)

    def backward(g):  # g = dL/dy (n, ..., d_out)
        g3 = g.reshape(n, -1, d_out)  # (n, L, d_out)
        dh = sk * mm(g3, Bk.transpose(0, 2, 1))  # dh = s_k g B_kᵀ: (n, L, d_out) @ (n, d_out, r) -> (n, L, r)
        gx = (mm(g3, W.data.T) + mm(dh, Ak.transpose(0, 2, 1))).reshape(x.shape) if x.requires_grad else None
        gW = mm(x3.reshape(-1, d_in).T, g3.reshape(-1, d_out)) if W.requires_grad else None  # xᵀ g, all rows
        gA = gB = None
        if A.requires_grad:  # dA_k = Σ_{i: k(i) = k} x_iᵀ dh_i: per sample, then added into its adapter's slot
            gA = xp.zeros(A.shape, dtype=A.dtype)
            backend.scatter_add(gA, ids, mm(x3.transpose(0, 2, 1), dh))  # (n, d_in, L) @ (n, L, r) -> (n, d_in, r)
        if B.requires_grad:  # dB_k = Σ_{i: k(i) = k} s_k h_iᵀ g_i
            gB = xp.zeros(B.shape, dtype=B.dtype)
            backend.scatter_add(gB, ids, sk * mm(h.transpose(0, 2, 1), g3))  # (n, r, L) @ (n, L, d_out)
        gb = g3.sum(axis=(0, 1)) if b is not None and b.requires_grad else None
        return (gx, gW, gA, gB, gb)[: len(parents)]

    return Tensor.from_op(y.reshape(*x.shape[:-1], d_out), parents, "multi_lora_linear", backward)


def multi_adapter_layers(model: Module) -> dict[str, MultiLoRALinear]:
    """name -> every layer of ``model`` that holds stacked adapters."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def check_adapters(model: Module, adapters: Sequence[Adapter]) -> dict[str, tuple[Module, str, Linear]]:
    """Every check ``apply_adapters`` needs, changing nothing -> name -> (parent, attribute, Linear) of every
    adapted layer."""
    if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, Adapter) for a in adapters):
        raise ValueError("apply_adapters: adapters must be a non-empty list of Adapter (Adapter.of, Adapter.load)")
    if lora_layers(model) or multi_adapter_layers(model):
        raise RuntimeError("apply_adapters: the model already has adapters (give it the plain base model)")
    names = set(adapters[0].factors)
    for k, a in enumerate(adapters):
        if set(a.factors) != names:  # one stack per layer: every adapter needs a slot in every adapted layer
            raise ValueError(f"apply_adapters: adapter {k} adapts {sorted(a.factors)}, adapter 0 adapts "
                             f"{sorted(names)}; a mixed batch needs the same layers in every adapter")
    layers = {name: (parent, attr, layer) for name, parent, attr, layer in target_layers(model, TARGETS)}
    missing = sorted(names - set(layers))
    if missing:
        raise ValueError(f"apply_adapters: no Linear layer {missing} in {type(model).__name__}")
    for k, a in enumerate(adapters):
        for name, (A, B) in a.factors.items():
            layer = layers[name][2]
            ok = A.ndim == 2 and B.ndim == 2 and A.shape[1] == B.shape[0] >= 1
            if not ok or A.shape[0] != layer.d_in or B.shape[1] != layer.d_out:
                raise ValueError(f"apply_adapters: adapter {k}, {name}: A {tuple(A.shape)} and B {tuple(B.shape)} "
                                 f"do not fit a ({layer.d_in}, {layer.d_out}) layer")
    return {n: layers[n] for n in sorted(names)}


def apply_adapters(model: Module, adapters: Sequence[Adapter]) -> Module:
    """Give every layer the adapters adapt all K of them, stacked (``MultiLoRALinear``), and freeze everything,
    in place. Checked first (``check_adapters``): an error leaves the model as it was. Returns the model."""
    layers = check_adapters(model, adapters)
    xp, K = backend.xp, len(adapters)
    for p in model.parameters():
        p.requires_grad = False
    for name, (parent, attr, layer) in layers.items():
        r = max(a.factors[name][0].shape[1] for a in adapters)
        dtype = layer.weight.dtype
        A, B = xp.zeros((K, layer.d_in, r), dtype=dtype), xp.zeros((K, r, layer.d_out), dtype=dtype)
        for k, a in enumerate(adapters):
            Ak, Bk = a.factors[name]
            A[k, :, : Ak.shape[1]] = backend.to_device(Ak, dtype)  # a smaller rank: zero columns of A and rows
            B[k, : Bk.shape[0]] = backend.to_device(Bk, dtype)  # of B, which add nothing to A·B
        scalings = backend.to_device([a.scaling for a in adapters], dtype)
        setattr(parent, attr, MultiLoRALinear(layer, A, B, scalings))
    return model


def check_ids(ids: Any, n_adapters: int) -> Any:
    """``ids`` as a host int64 array (n,) of adapter indices, each in 0..n_adapters-1; otherwise a ValueError.
    Negative indices are refused too: NumPy would read -1 as the last adapter, silently."""
    np = backend.np
    arr = np.asarray(backend.to_numpy(ids) if hasattr(ids, "shape") else ids)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"adapter ids must be a non-empty list of integers (one per sample), got {ids!r}")
    bad = np.flatnonzero((arr < 0) | (arr >= n_adapters))
    if bad.size:
        raise ValueError(f"adapter index {int(arr[bad[0]])} (sample {int(bad[0])}) out of range: the model holds "
                         f"{n_adapters} adapters, 0..{n_adapters - 1}")
    return arr.astype(np.int64)


@contextlib.contextmanager
def use_adapters(model: Module, ids: Any) -> Iterator[Module]:
    """Inside the block, sample i of every batch the model sees runs with adapter ``ids[i]``. The ids are checked
    before anything is set, and cleared afterwards, even on an error."""
    layers = list(multi_adapter_layers(model).values())
    if not layers:
        raise ValueError("use_adapters: the model holds no adapters (apply_adapters first)")
    chosen = backend.to_device(check_ids(ids, layers[0].n_adapters))
    for m in layers:
        m.ids = chosen
    try:
        yield model
    finally:
        for m in layers:
            m.ids = None


def adapter_bytes(model: Module) -> int:
    """Bytes of the stacked adapters (every A and B, and the scalings) of ``model``."""
    return sum(int(m.A.data.nbytes + m.B.data.nbytes + m.scalings.nbytes) for m in multi_adapter_layers(model).values())
