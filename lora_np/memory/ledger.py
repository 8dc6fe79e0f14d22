"""The analytic ledger: the bytes of one training step by category, predicted from the configs alone.

weights, gradients and optimizer state are parameter counts (``count_trainable``: the sizes model.py and lora.py
allocate) times the bytes of a number; activations are a sum of terms of the config, derived below
(``_activation_bytes``). Full fine-tuning
of some weights only (``prepare_finetuning(model, None, train_only=("q", "v"))``) is modelled the same way: those
layers' weights and biases train, everything else is frozen. QLoRA (LoRA on a base whose block Linears store W in 4
bits, ``qlora.quantize_base``; ``quant=``) changes one term: each such W counts its stored bytes, ½ a number + the
block scales (``quantize.stored_nbytes``), instead of 4; ``Ledger.quantized`` is that part of the weights. The
activations do not change: a 4-bit W is dequantized when an op reads it, and the float copies the graph keeps are
the ones it keeps of a float W (fused_linear's merged or concatenated weights).

How the activations are counted
-------------------------------
The engine's rule (``Tensor.from_op`` in engine.py): an op joins the graph when one of its inputs requires a
gradient. A graph node holds its input Tensors (``_parents``, and its ``backward`` closure) and whatever arrays
the closure captured, until backward has passed it (backward frees the graph as it goes). So every INPUT of a
graph op stays alive through the forward pass, and so does every array its closure captured; an op outside the
graph keeps nothing. This engine keeps parents even where backward does not need their values (both inputs of an
addition, for instance): PyTorch keeps only what backward reads.

``_activation_bytes`` adds up what that rule keeps, term by term, for any targets, modules_to_save, train_only,
dropout and the first block (whose input needs no gradient under LoRA). The measured side counts the same arrays
on the real graph (``graph.graph_bytes``, ``Measured.graph``), and the tests check the two agree to the byte. For
full fine-tuning the terms come to this sum (floats of ``dtype_bytes``; N = B·T tokens, C channels, H heads, V
vocabulary; a test checks it):

    embeddings   2·N·C + T·C         wte(idx) and wpe(pos) gathered, their sum; + 8·T bytes for pos (int64)
    per block:
      ln1          2·N·C + N         output, xhat (and rstd, N): layer_norm's closure keeps xhat and rstd
      q, k, v      3·N·C + 3·C²      fused.fused_linear: [x W_q | x W_k | x W_v] from one product; it keeps the
                                     concatenated (C, 3C) weights for dx = g [W_q W_k W_v]ᵀ
      attention    B·H·T² + N·C      F.causal_attention keeps the attention weights; its output (B, T, C)
      o            N·C
      residual     N·C               x + attn
      ln2          2·N·C + N
      up           4·N·C
      gelu         2·4·N·C           output, and tanh(u), which its closure keeps
      down         N·C
      residual     N·C               x + mlp
      = 24·N·C + 2·N + B·H·T² + 3·C²  floats
    head         2·N·C + N           ln_f;  + N·V logits + N·V log-probs (cross_entropy keeps them)
                                     + 9·N bytes: the valid mask (bool) and the clamped targets (int64)

LoRA, in every block whose input requires a gradient, keeps per adapted layer (d_in, d_out) the same as
above plus N·r: ``fused.fused_linear`` is one fused op whose closure keeps the thin h = x@A (N, r) besides x, and
the merged W + s·A@B (d_in, d_out) of a layer computed alone (o, up, down) for dx. In block 0 the input does not
require a gradient (the embeddings are frozen), so ln1 and the projections there keep less. Dropout with p > 0
adds its float mask (``scale``) and output wherever it is in the graph (LoRA dropout: the mask (N, d_in), and W
is not merged); with attention dropout the attention is composed from separate ops (model.py), which keep
4·B·H·T² + N·C floats and the T² bytes of the mask.

So LoRA does not save activations here: the frozen layers above an adapter still pass gradients down to it, so
they stay in the graph, and a graph node here keeps all its inputs. That last part is this engine's choice, not a
necessity: a frozen layer's backward computes dx = g·Wᵀ, which needs W (kept anyway), not its input x. An engine
that keeps only what each backward reads (PyTorch does) drops the inputs of frozen o, up and down under LoRA on
q, v; what the maths needs is the inputs of the adapted layers (dA = xᵀ·dh), h, and the states of the
nonlinearities (attention weights, layer norm's xhat, GELU's tanh(u), the log-probs).

Not counted: the batch itself (x and y exist before the step), 0-d scalars (a few bytes each) and the Python
objects of the graph (Tensors, closures; a few hundred bytes per node, visible in the measurement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import checks
from ..lora import (
    TARGETS,
    LoRAConfig,
    check_setup,
    finetuning_mode,
    lora_layers,
    resolve_train_only,
    target_layers,
)
from ..model import GPT, GPTConfig
from ..quantize import QuantConfig, stored_nbytes

MIB = 2**20
CATEGORIES = ("weights", "gradients", "optimizer", "activations")
INT_BYTES = 8  # integer index arrays (xp.arange, the clamped targets) are int64
BOOL_BYTES = 1  # the causal mask and the cross-entropy's valid mask


# -- the analytic ledger -----------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Bytes of one training step by category, predicted from the config (see the module docstring)."""

    weights: int  # every parameter, frozen ones included
    gradients: int  # one .grad per trainable parameter
    optimizer: int  # AdamW: m and v, 2 × trainable
    activations: int  # what the graph keeps from the forward pass until backward is done
    mode: str = ""
    quantized: int = 0  # the part of `weights` stored in 4 bits (QLoRA's frozen W: codes + scales); 0 for a float base

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        """The ledger in MiB, one line per category (and the 4-bit part of the weights, if any)."""
        lines = [f"{'':<12} {'MiB':>10}   ({self.mode})"]
        lines += [f"{cat:<12} {getattr(self, cat) / MIB:>10.2f}" for cat in CATEGORIES]
        if self.quantized:
            lines.insert(2, f"{'  4-bit W':<12} {self.quantized / MIB:>10.2f}")
        lines.append(f"{'total':<12} {self.total / MIB:>10.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**{cat: getattr(self, cat) for cat in CATEGORIES}, "total": self.total, "quantized": self.quantized}


def count_trainable(config: GPTConfig, lora: LoRAConfig | None, train_only: Sequence[str] | str = ()
                    ) -> tuple[int, int]:
    """(all parameters, trainable parameters) of ``GPT(config)`` set up with ``lora`` (None: full fine-tuning),
    or with ``lora=None, train_only=("q", "v")`` (only those Linear layers of every block train, weight and bias),
    counted from the config alone: the setups of ``lora.prepare_finetuning``.

    Equal to ``count_parameters(model)`` of the real model (a test checks it): the same sizes as model.py and lora.py
    allocate, so the bytes of the ledger are the ``nbytes`` of the real arrays.
    """
    only = check_setup(lora, train_only, "memory")
    C, V, bias = config.n_embd, config.vocab_size, config.bias
    linears = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "up": (C, 4 * C), "down": (4 * C, C)}
    layer_norm = C + (C if bias else 0)  # weight, and bias when config.bias
    lm_head = 0 if config.tie_weights else C * V  # no bias; tied: the logits use wte's table, counted once
    top = {"wte": V * C, "wpe": config.block_size * C, "ln_f": layer_norm, "lm_head": lm_head}
    linear_params = {t: d_in * d_out + (d_out if bias else 0) for t, (d_in, d_out) in linears.items()}
    base = sum(top.values()) + config.n_layer * (2 * layer_norm + sum(linear_params.values()))
    if lora is None:
        return base, (config.n_layer * sum(linear_params[t] for t in only) if only else base)
    checks.max_rank(lora.r, config.n_embd, "n_embd")  # every target is C x C or C x 4C
    adapters = config.n_layer * sum(lora.r * (d_in + d_out) + (d_out if lora.dora else 0)  # DoRA: m (d_out,)
                                    for t, (d_in, d_out) in linears.items() if t in lora.targets)
    return base + adapters, adapters + sum(top[m] for m in lora.modules_to_save)


def analytic_ledger(config: GPTConfig, lora: LoRAConfig | None, batch_size: int, block_size: int | None = None,
                    dtype_bytes: int = 4, train_only: Sequence[str] | str = (), quant: QuantConfig | None = None
                    ) -> Ledger:
    """The predicted bytes of one training step of ``GPT(config)`` set up with ``lora`` (None: full fine-tuning;
    with ``train_only``, full fine-tuning of those Linear layers only, see ``lora.prepare_finetuning``) on a batch
    of ``batch_size`` sequences of ``block_size`` tokens (default ``config.block_size``), with AdamW.

    weights = all parameters; gradients = trainable; optimizer = 2 × trainable; activations from the terms of the
    module docstring (``_activation_bytes``). Dropout counts as in training mode (``config.dropout``, ``lora.dropout``).
    With ``quant`` (LoRA only), the W of every block Linear counts its 4-bit storage (``quantized_bytes``).
    """
    T = config.block_size if block_size is None else block_size
    if not 1 <= T <= config.block_size or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and 1 <= block_size <= {config.block_size}, got {batch_size}, {T}")
    total, trainable = count_trainable(config, lora, train_only)
    if lora is not None and lora.dora:  # PiSSA keeps LoRA's graph exactly; DoRA's op does not
        raise ValueError("analytic_ledger: DoRA's op (lora.dora_linear) keeps V (d_in, d_out) and z (N, d_out) per "
                         "layer besides LoRA's arrays, and runs q, k, v apart: the ledger does not model it")
    only = resolve_train_only(train_only)
    acts = _activation_bytes(config, lora, batch_size, T, dtype_bytes, only)
    if quant is not None and lora is None:
        raise ValueError("analytic_ledger: a 4-bit base (quant) trains adapters only; give lora")
    n_4bit, quantized = quantized_bytes(config, quant) if quant is not None else (0, 0)
    return Ledger(weights=(total - n_4bit) * dtype_bytes + quantized, gradients=trainable * dtype_bytes,
                  optimizer=2 * trainable * dtype_bytes, activations=acts, mode=finetuning_mode(lora, only),
                  quantized=quantized)


def quantized_bytes(config: GPTConfig, quant: QuantConfig) -> tuple[int, int]:
    """(numbers, stored bytes) of the W of every block Linear (q, k, v, o, up, down) in 4 bits with ``quant``, as
    ``qlora.quantize_base`` stores them: each weight on its own, so each has its own blocks and scale groups."""
    C = config.n_embd
    sizes = [C * C] * 4 + [C * 4 * C] * 2  # q, k, v, o; up, down
    return config.n_layer * sum(sizes), config.n_layer * sum(stored_nbytes(n, quant) for n in sizes)


def ledger_of(model: GPT, batch_size: int, block_size: int | None = None) -> Ledger:
    """``analytic_ledger`` for a model that is already set up: LoRA layers (and their config) mean LoRA, a model
    whose every parameter trains means full fine-tuning, and a model whose trainable parameters are exactly the
    Linear layers of some targets in every block (``prepare_finetuning(model, None, train_only=...)``) means full
    fine-tuning of those. Anything else is not a setup the ledger models."""
    dtype_bytes = model.parameters()[0].dtype.itemsize
    if lora_layers(model):
        if any(m.merged for m in lora_layers(model).values()):
            raise ValueError("ledger_of: the model's LoRA layers are merged; unmerge() before training")
        return analytic_ledger(model.config, model.lora_config, batch_size, block_size, dtype_bytes,
                               quant=getattr(model, "quant_config", None))  # set by qlora.quantize_base
    if all(p.requires_grad for p in model.parameters()):
        return analytic_ledger(model.config, None, batch_size, block_size, dtype_bytes)
    # the targets whose layers train, found by structure: every block's layer of that name, weight and bias
    trains = {id(p) for p in model.trainable_parameters()}
    only = tuple(t for t in TARGETS if any(id(p) in trains for *_, m in target_layers(model, [t])
                                           for p in m.parameters()))
    expected = {id(p) for *_, m in target_layers(model, only) for p in m.parameters()}
    if only and trains == expected:
        return analytic_ledger(model.config, None, batch_size, block_size, dtype_bytes, train_only=only)
    raise ValueError("ledger_of: a model without LoRA must train every parameter (full fine-tuning) or exactly the "
                     "Linear layers of some targets (train_only) to be modelled")


# -- the activations, term by term ------------------------------------------------------------------------------


def _activation_bytes(cfg: GPTConfig, lora: LoRAConfig | None, B: int, T: int, f: int,
                      train_only: Sequence[str] = ()) -> int:
    """Bytes the graph of ``GPT.forward`` + cross-entropy keeps alive: the module docstring's terms, block by block.

    An op is in the graph when one of its inputs requires a gradient; an array is kept when some op in the graph
    reads it (or its closure captured it). ``g_*`` says whether an op is in the graph (so its output requires a
    gradient); each array is added once, at the op that reads it (the block's input at ln1 and the residual).
    """
    N, C, H, V, S = B * T, cfg.n_embd, cfg.n_head, cfg.vocab_size, B * cfg.n_head * T * T  # S: one (B, nh, T, T)
    full = lora is None and not train_only  # every weight trains
    r, targets, saved = (0, (), ()) if lora is None else (lora.r, lora.targets, lora.modules_to_save)
    p, p_lora = cfg.dropout, (0.0 if lora is None else lora.dropout)

    def trains(name: str) -> bool:  # a block Linear: its weight trains (full, train_only) or it has an adapter
        return full or name in train_only or name in targets

    def adapter(name: str, d_in: int, d_out: int, x_grad: bool, alone: bool) -> int:
        """What fused_linear keeps for an adapted layer besides x: h = x @ A (N, r), LoRA dropout's mask (N, d_in),
        and (a layer computed alone, without dropout, whose x needs a gradient) the merged W + s·A@B."""
        if name not in targets:
            return 0
        merged = d_in * d_out if alone and x_grad and p_lora == 0 else 0
        return N * r + (N * d_in if p_lora > 0 else 0) + merged

    floats, extra = 0, 0  # extra: bytes that are not floats (int64 positions and targets, bool masks)
    g_tok, g_pos = full or "wte" in saved, full or "wpe" in saved
    g_x = g_tok or g_pos  # the embeddings' sum needs a gradient
    extra += INT_BYTES * T if g_pos else 0  # wpe(arange(T)) keeps the positions
    floats += (N * C + T * C) if g_x else 0  # the sum keeps tok (N, C) and pe (T, C)
    floats += 2 * N * C if g_x and p > 0 else 0  # dropout keeps its input and its mask
    for _ in range(cfg.n_layer):
        g_ln1 = g_x or full
        g_qkv = g_ln1 or any(trains(t) for t in ("q", "k", "v"))
        g_o = g_qkv or trains("o")
        g_res1 = g_x or g_o
        g_ln2 = g_res1 or full
        g_up = g_ln2 or trains("up")
        g_down = g_up or trains("down")
        g_res2 = g_res1 or g_down
        floats += N * C if g_ln1 or g_res1 else 0  # the block's input x, read by ln1 and the residual
        floats += N * C + N if g_ln1 else 0  # ln1: xhat, rstd
        if g_qkv:  # [q | k | v] = ln1(x) @ [W_q W_k W_v]: keeps ln1(x), h per adapter, the (C, 3C) weights
            floats += N * C + (3 * C * C if g_ln1 else 0)
            floats += sum(adapter(t, C, C, g_ln1, alone=False) for t in ("q", "k", "v"))
            if p == 0:  # F.causal_attention: keeps [q | k | v] and the attention weights
                floats += 3 * N * C + S
            else:  # composed ops keep six (B, nh, T, T): q @ kT, scaled, masked, softmax, dropout's mask and output;
                # and att @ v (B, nh, T, hs) where merging the heads copies it (a view when nh = 1 or T = 1)
                floats += 3 * N * C + 6 * S + (N * C if H > 1 and T > 1 else 0)
                extra += T * T  # the causal mask (bool)
        if g_o:
            floats += N * C + adapter("o", C, C, g_qkv, alone=True)  # o keeps the attention's output
        floats += N * C if g_res1 else 0  # the residual keeps the attention branch (o's or dropout's output)
        floats += 2 * N * C if g_o and p > 0 else 0  # dropout after o keeps o's output and its mask
        floats += N * C if g_ln2 or g_res2 else 0  # x + attn, read by ln2 and the next residual
        floats += N * C + N if g_ln2 else 0  # ln2: xhat, rstd
        if g_up:
            floats += N * C + adapter("up", C, 4 * C, g_ln2, alone=True)  # up keeps ln2(x)
            floats += 2 * 4 * N * C  # gelu keeps u (N, 4C) and tanh(u)
        if g_down:
            floats += 4 * N * C + adapter("down", 4 * C, C, g_up, alone=True)  # down keeps gelu(u)
        floats += N * C if g_res2 else 0  # the residual keeps the MLP branch
        floats += 2 * N * C if g_down and p > 0 else 0  # dropout after down: its input and mask
        g_x = g_res2
    g_lnf = g_x or full or "ln_f" in saved
    floats += N * C + N * C + N if g_lnf else 0  # ln_f keeps x, xhat, rstd
    g_head = g_lnf or full or ("wte" if cfg.tie_weights else "lm_head") in saved
    floats += N * C if g_head else 0  # the head keeps ln_f(x)
    floats += 2 * N * V  # cross_entropy keeps the logits (its input) and the log-probs
    extra += N * BOOL_BYTES + N * INT_BYTES  # and the valid mask and the clamped targets
    return floats * f + extra
