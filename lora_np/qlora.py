"""QLoRA's frozen base (Dettmers et al. 2023, arXiv 2305.14314): W stored in 4 bits, LoRA on top unchanged.

    quantize_base(model, QuantConfig(kind="nf4", block=64, double_quant=True))   # every block Linear's W in 4 bits
    apply_lora(model, LoRAConfig(r=8, targets="q,v"))                           # as on a float base
    ... train: only A and B have gradients; y = x @ deq(W) + b + s·(x @ A) @ B

The decision: the 4 bits live in the weight itself. ``QuantizedWeight`` is a frozen ``Parameter`` whose storage is
a ``quantize.Quantized4bit`` and whose ``.data`` dequantizes it on every read. Why there and not in a new Linear
class: every op of lora_np reads a parameter through ``.data``, and the attention's q, k and v are computed by
``fused.fused_linear`` from the layers' weights, not through the layers' forward. A weight that dequantizes when
read therefore makes ``F.linear``, ``fused_linear`` and ``LoRALinear`` run on a 4-bit W without a line of theirs
changed. That is QLoRA's own recipe: store in NF4, compute in the float dtype (bitsandbytes' ``Linear4bit``
dequantizes W inside its forward and again inside its backward).

What follows from it:

* The order does not matter: ``quantize_base`` before or after ``apply_lora`` gives the same model, because a
  ``LoRALinear`` holds the very weight object of the Linear it wrapped, and ``quantize_base`` replaces the weight of
  whichever of the two sits in the block.
* Forward dequantizes W; backward needs W only for dx = g Wᵀ: ``F.linear`` (a layer without LoRA) reads ``.data``
  again there, so it dequantizes again and the float W dies between the two passes. ``fused_linear`` keeps the
  W' = deq(W) + s·A·B it built in forward until backward (its merge-on-the-fly trick): one float copy per adapted
  layer during a step. W never gets a gradient: ``requires_grad`` is always False, and asking for True is an error.
* W cannot change: assigning ``.data`` accepts only the values it holds (``Module.to(float64)``, a cast, works);
  anything else (``merge``, ``load_state_dict``, an update) is a RuntimeError and changes nothing. To merge, take a
  float base first: ``dequantize_base(model)``, then ``merge(model)``. W + s·A·B is not a 4-bit number.
* The block Linears (q, k, v, o, up, down) are quantized; the embeddings, layer norms, biases and the head stay
  float, as in QLoRA (transformers keeps ``lm_head`` in 16 bits). They are a small part of a large model.
* ``state_dict`` and the base fingerprint of an adapter see the dequantized values: an adapter trained on a 4-bit
  base records that base, and loading it into the float base is refused as a different base.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend
from .lora import TARGETS, lora_layers, target_layers
from .nn import Module, Parameter
from .quantize import QuantConfig, Quantized4bit, quantize


class QuantizedWeight(Parameter):
    """A frozen weight stored in 4 bits: ``.data`` is ``quantized.dequantize()`` (a fresh float array on every
    read), ``shape``/``dtype``/``size`` come from the storage without dequantizing, ``nbytes`` is what is stored."""

    def __init__(self, quantized: Quantized4bit, dtype: Any = None) -> None:
        self.quantized = quantized
        self._dtype = backend.np.dtype(dtype or backend.DEFAULT_DTYPE)  # what dequantizing gives (the compute dtype)
        super().__init__(quantized.dequantize(self._dtype), requires_grad=False)  # the setter sees its own values

    @property
    def data(self) -> Any:
        return self.quantized.dequantize(self._dtype)  # (d_in, d_out), computed from the 4-bit codes

    @data.setter
    def data(self, value: Any) -> None:
        why = self.refuses(value)
        if why:
            raise RuntimeError(why)
        self._dtype = backend.np.dtype(value.dtype)

    def refuses(self, value: Any) -> str:
        # The values are the code book's times the block scales: an array is accepted only if it holds exactly
        # them (a cast to another float dtype, as Module.to does). Anything else would be silently re-rounded.
        dtype = getattr(value, "dtype", None)
        if (tuple(getattr(value, "shape", ())) == self.shape and dtype is not None
                and backend.np.dtype(dtype).kind == "f"
                and bool(backend.xp.array_equal(backend.to_device(value), self.quantized.dequantize(dtype)))):
            return ""
        return ("a 4-bit weight is frozen and holds its code book's values: it cannot take new ones (merge, "
                "load_state_dict, an update); dequantize_base(model) first")

    @property
    def requires_grad(self) -> bool:
        return False

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:  # QLoRA trains adapters on a frozen 4-bit base; a gradient step cannot land on 16 levels
            raise RuntimeError("a 4-bit weight cannot train (QLoRA trains only the adapters); "
                               "dequantize_base(model) first for full fine-tuning")

    shape = property(lambda self: self.quantized.shape)
    ndim = property(lambda self: len(self.quantized.shape))
    dtype = property(lambda self: self._dtype)
    size = property(lambda self: self.quantized.size)
    nbytes = property(lambda self: self.quantized.nbytes)  # stored bytes: ½ a number + the scales

    def __repr__(self) -> str:
        c = self.quantized.config
        return (f"QuantizedWeight(shape={self.shape}, kind={c.kind}, block={c.block}, "
                f"double_quant={c.double_quant}, {self.nbytes / self.size:.4f} bytes/number)")


def quantized_weights(model: Module) -> dict[str, QuantizedWeight]:
    """name -> every 4-bit weight of ``model``."""
    return {n: p for n, p in model.named_parameters() if isinstance(p, QuantizedWeight)}


def quantize_base(model: Module, config: QuantConfig | None = None, **kwargs: Any) -> Module:
    """Store the weight of every block Linear (q, k, v, o, up, down; plain or under LoRA) in 4 bits, in place.

    ``quantize_base(model, QuantConfig(block=64, double_quant=True))`` or, as a convenience,
    ``quantize_base(model, block=64, double_quant=True)``. Every weight is quantized before the first is replaced,
    so an error (a block that does not divide a weight's size, NaN values, a model already quantized or with merged
    LoRA layers) leaves the model exactly as it was. Records ``model.quant_config``; returns the model."""
    if config is not None and kwargs:
        raise TypeError(f"quantize_base: give a QuantConfig or keyword arguments, not both (got {sorted(kwargs)})")
    config = config if config is not None else QuantConfig(**kwargs)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_base: expected a QuantConfig, got {type(config).__name__}")
    if quantized_weights(model):
        raise RuntimeError("quantize_base: the model is already quantized (dequantize_base first to change it)")
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:  # W holds W0 + s·A·B: quantizing it would bake the adapter into the base, unmerge() could not undo it
        raise RuntimeError(f"quantize_base: unmerge() first; merged LoRA layers: {merged}")
    layers = target_layers(model, TARGETS)
    if not layers:
        raise ValueError(f"quantize_base: no Linear layer named {list(TARGETS)} in {type(model).__name__}")
    stored = []
    for name, _, _, layer in layers:  # all checks and all the work first: nothing is replaced until all succeed
        try:
            stored.append(QuantizedWeight(quantize(layer.weight.data, config), layer.weight.dtype))
        except ValueError as e:
            raise ValueError(f"quantize_base: {name}.weight: {e}") from None
    for (_, _, _, layer), weight in zip(layers, stored):
        layer.weight = weight  # a LoRALinear's weight is the one its Linear had: LoRA reads the 4-bit one now
    model.quant_config = config
    return model


def dequantize_base(model: Module) -> Module:
    """Give every 4-bit weight back as a float Parameter (frozen) of its dequantized values, in place: what merging
    an adapter into a QLoRA base needs. The float weights hold the quantization error, not the original W."""
    layers = [(layer, layer.weight) for *_, layer in target_layers(model, TARGETS)
              if isinstance(layer.weight, QuantizedWeight)]
    if not layers:
        raise ValueError("dequantize_base: the model has no 4-bit weights")
    for layer, weight in layers:
        layer.weight = Parameter(weight.data, requires_grad=False)
    del model.quant_config
    return model


def weight_bytes(model: Module) -> dict[str, int]:
    """Stored bytes and numbers of the block Linears' weights: ``{"bytes": ..., "numbers": ...}`` (4-bit ones at
    their packed size, float ones at their itemsize)."""
    weights = [layer.weight for *_, layer in target_layers(model, TARGETS)]
    return {"bytes": sum(int(w.nbytes) if isinstance(w, QuantizedWeight) else int(w.data.nbytes) for w in weights),
            "numbers": sum(math.prod(w.shape) for w in weights)}
