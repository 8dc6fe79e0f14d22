"""A GPT-2-style language model (Radford et al. 2019), small enough to train on a laptop with NumPy.

Pre-LayerNorm blocks, learned position embeddings, causal self-attention with SEPARATE q, k, v, o projections
(GPT-2 fuses q, k, v into one matrix; keeping them apart lets LoRA adapt each alone, as in Hu et al. Table 5),
a 4x tanh-GELU MLP (``up`` then ``down``), a final LayerNorm and an untied LM head (tied to ``wte`` with
``tie_weights=True``, as GPT-2 itself: see ``gpt2.py``). Shapes: B batch, T time,
C = n_embd channels, nh heads, hs = C / nh head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from . import backend, checks
from . import functional as F
from .engine import Tensor, split
from .lora import shared_input_linear
from .nn import DROPOUT_SEED_BOUND, Dropout, Embedding, LayerNorm, Linear, Module


@dataclass
class GPTConfig:
    vocab_size: int = 103  # characters of the default corpora (KJV Bible ∪ Python docs); set from the tokenizer
    block_size: int = 64  # context length T_max: positions beyond it have no embedding
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; n_embd must divide by it
    n_embd: int = 128  # channels C (the d of LoRA's d x d projections)
    dropout: float = 0.0  # after attention, MLP and embeddings; 0 for short runs on small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    seed: int = 0  # weight initialisation (and dropout masks)
    layer_norm_eps: float = 1e-5  # added to the variance in every LayerNorm (GPT-2's layer_norm_epsilon)
    tie_weights: bool = False  # True: no lm_head, the logits use wte's table transposed (GPT-2 does this)

    def __post_init__(self) -> None:
        checks.fields(self, checks.positive_int, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        checks.fields(self, checks.probability, "dropout")
        checks.fields(self, checks.flag, "bias", "tie_weights")
        checks.fields(self, checks.nonnegative_int, "seed")
        checks.fields(self, checks.fraction, "layer_norm_eps")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CausalSelfAttention(Module):
    def __init__(self, cfg: GPTConfig, gen: Any) -> None:
        C, resid_std = cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: scale residual projections
        self.n_head = cfg.n_head
        self.q = Linear(C, C, cfg.bias, gen=gen)
        self.k = Linear(C, C, cfg.bias, gen=gen)
        self.v = Linear(C, C, cfg.bias, gen=gen)
        self.o = Linear(C, C, cfg.bias, std=resid_std, gen=gen)
        self.attn_drop = Dropout(cfg.dropout, seed=int(gen.integers(DROPOUT_SEED_BOUND)))
        self.resid_drop = Dropout(cfg.dropout, seed=int(gen.integers(DROPOUT_SEED_BOUND)))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        # q, k and v read the same x: one op computes [x W_q | x W_k | x W_v] (LoRA included) with one product
        qkv = shared_input_linear(x, [self.q, self.k, self.v])  # (B, T, C) -> (B, T, 3C)
        if not (self.attn_drop.p > 0 and self.training):
            y = F.causal_attention(qkv, nh)  # (B, T, 3C) -> (B, T, C): the steps below, as one op
        else:  # dropout on the attention weights needs them as a tensor: the same computation from separate ops
            q, k, v = (t.reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for t in split(qkv, 3))  # (B, nh, T, hs) each
            att = q @ k.transpose(0, 1, 3, 2)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
            att = att * (1.0 / math.sqrt(hs))  # (B, nh, T, T), scaled so the softmax is not saturated at init
            future = backend.xp.triu(backend.xp.ones((T, T), dtype=bool), k=1)  # (T, T): True above the diagonal
            att = att.masked_fill(future, -math.inf)  # (B, nh, T, T): position t attends to positions <= t only
            att = self.attn_drop(F.softmax(att, axis=-1))  # (B, nh, T, T), rows sum to 1
            y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
            y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        return self.resid_drop(self.o(y))  # (B, T, C)


class MLP(Module):
    def __init__(self, cfg: GPTConfig, gen: Any) -> None:
        C = cfg.n_embd
        self.up = Linear(C, 4 * C, cfg.bias, gen=gen)
        self.down = Linear(4 * C, C, cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer), gen=gen)
        self.drop = Dropout(cfg.dropout, seed=int(gen.integers(DROPOUT_SEED_BOUND)))

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(Module):
    def __init__(self, cfg: GPTConfig, gen: Any) -> None:
        self.ln1 = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg, gen)
        self.ln2 = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps)
        self.mlp = MLP(cfg, gen)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))  # pre-LN: normalise the input of each sub-layer, keep the residual clean
        return x + self.mlp(self.ln2(x))


class GPT(Module):
    def __init__(self, cfg: GPTConfig) -> None:
        self.config = cfg
        gen = backend.rng(cfg.seed)
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, gen=gen)  # token embeddings (V, C)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, gen=gen)  # position embeddings (block_size, C)
        self.drop = Dropout(cfg.dropout, seed=int(gen.integers(DROPOUT_SEED_BOUND)))
        self.blocks = [Block(cfg, gen) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps)
        # Untied (default): the head is its own (C, V) matrix, frozen or trained alone. Tied: no head at all, the
        # logits use wte's (V, C) table transposed, so one matrix both reads and writes tokens (and gets both grads).
        self.lm_head = None if cfg.tie_weights else Linear(cfg.n_embd, cfg.vocab_size, bias=False, gen=gen)

    def forward(self, idx: Any, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) integer token ids -> logits (B, T, V); with targets (B, T) ids, also the mean cross-entropy;
        with targets (B, T, V) probabilities, the mean soft-target cross-entropy (``F.soft_cross_entropy``)."""
        idx = backend.to_device(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT.forward: idx must be (B, T) token ids, got shape {idx.shape}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT.forward: sequence length {T} exceeds block_size {self.config.block_size}")
        pos = backend.xp.arange(T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if self.lm_head is None:  # tied: wte's (V, C) table transposed is the (C, V) head
            logits = F.linear(x, self.wte.weight.T)  # (B, T, C) @ (C, V) -> (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        t = targets.data if isinstance(targets, Tensor) else targets
        # (B, T) ids: the next-token loss; (B, T, V) probabilities (a teacher's): distillation's soft targets
        soft = getattr(t, "ndim", 0) == 3 and t.dtype.kind == "f"
        loss = F.soft_cross_entropy(logits, t) if soft else F.cross_entropy(logits, t)
        return logits, loss

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None) -> Any:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); returns host ids (B, T + max_new_tokens).

        Runs without a graph and with dropout off (the previous mode is restored). No KV cache: each new token
        re-reads the last block_size tokens, which is simple and fast enough at this size. ``temperature``
        divides the logits; ``top_k`` keeps the k most likely tokens; sampling uses a host generator from ``seed``.
        """
        checks.positive_number(temperature, "generate: temperature")
        if top_k is not None:
            top_k = checks.integer(top_k, "generate: top_k", 1, self.config.vocab_size)
        np, gen = backend.np, backend.rng(seed)
        ids = np.array(backend.to_numpy(idx), dtype=np.int64, ndmin=2)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate: idx must be (B, T) with T >= 1 tokens to continue, got shape {ids.shape}")
        with self.inference():
            for _ in range(max_new_tokens):
                logits, _ = self(ids[:, -self.config.block_size:])
                z = backend.to_numpy(logits.data[:, -1, :]).astype(np.float64) / temperature  # (B, V)
                if top_k is not None:
                    kth = np.sort(z, axis=-1)[:, -top_k][:, None]
                    z = np.where(z < kth, -np.inf, z)
                p = np.exp(z - z.max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                nxt = [gen.choice(p.shape[-1], p=row) for row in p]
                ids = np.concatenate([ids, np.array(nxt, dtype=np.int64)[:, None]], axis=1)
        return ids
